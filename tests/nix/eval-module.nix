# Evaluate module.nix (and, with seed = true, nix/seed-compat.nix) with nixpkgs' real module system:
# `lib.evalModules` and `lib.types` from the nixpkgs lib at `nixpkgsLib`, the NixOS options the
# module touches declared as NixOS declares them (./nixos.nix), and a small `pkgs` (./pkgs.nix).
#
#   nix-instantiate --eval --strict --json --read-write-mode tests/nix/eval-module.nix \
#     --argstr nixpkgsLib /path/to/nixpkgs/lib \
#     --arg user '{ services.nixcache = { … }; }' [--arg seed true]
#
# `user` is the machine's configuration (a NixOS module). As NixOS does, failing assertions are
# reported instead of the system: the result then holds only `assertions` and `warnings`.
{ nixpkgsLib, user ? { }, seed ? false }:

let
  lib = import nixpkgsLib;
  pkgs = import ./pkgs.nix { inherit lib; };

  inherit (lib.evalModules {
    modules = [
      ./nixos.nix
      ../../module.nix
      { _module.args.pkgs = pkgs; }
      (lib.setDefaultModuleLocation "the machine's configuration" { networking.hostName = lib.mkDefault "testhost"; })
      (lib.setDefaultModuleLocation "the test's configuration (--arg user)" user)
    ] ++ lib.optional seed ../../nix/seed-compat.nix;
  }) config options;

  failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  ok = failed == [ ];
  enabled = config.systemd.services ? nixcache;

  # The unit's options module.nix (or the test) defines, plus what NixOS derives from them
  # (options left undefined without a default, like startLimitBurst, cannot be shown).
  namesIn = v:
    if v._type or "" == "merge" then lib.concatMap namesIn v.contents
    else if v._type or "" == "if" then lib.optionals v.condition (namesIn v.content)
    else if v._type or "" == "override" then namesIn v.content
    else lib.attrNames v;
  defined = lib.unique (lib.concatMap (d: namesIn (d.nixcache or { })) options.systemd.services.definitions);
  service = lib.getAttrs (defined ++ [ "name" "unitConfig" "environment" "path" ]) config.systemd.services.nixcache;
in
{
  assertions = failed;
  inherit (config) warnings;
} // lib.optionalAttrs ok {
  service = if enabled then service else null;
  unit = if enabled then config.systemd.units."nixcache.service" else null;
  nixSettings = config.nix.settings;
  nixcache = builtins.removeAttrs config.services.nixcache [ "package" ];
}
