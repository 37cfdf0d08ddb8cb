# Evaluate module.nix (and the seed-compatible module) without nixpkgs, which cannot be
# fetched here. The few `lib` functions and types the modules use are written out below,
# following nixpkgs' semantics for what they are used for; the "module system" is the
# smallest faithful one: option defaults, overridden by user values, overridden by the
# modules' `config` (mkIf / mkMerge resolved). The real module system merges option by option
# lazily; here each round evaluates the modules against the previous round's config, and three
# rounds settle what these modules do (seed options → services.nixcache → systemd/nix).
#
#   nix-instantiate --eval --strict --json --read-write-mode tests/nix/eval.nix \
#     --arg user '{ services.nixcache = { ... }; }' [--arg seed true]
{ user, seed ? false }:

let
  isType = t: v: builtins.isAttrs v && (v._type or null) == t;

  lib = rec {
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption { type = types.bool; default = false; description = "Whether to enable ${name}."; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    optional = cond: x: if cond then [ x ] else [ ];
    optionalAttrs = cond: attrs: if cond then attrs else { };
    filterAttrs = pred: attrs:
      builtins.listToAttrs (builtins.concatMap
        (name: if pred name attrs.${name} then [{ inherit name; value = attrs.${name}; }] else [ ])
        (builtins.attrNames attrs));
    hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
    # nixpkgs: recursively merge attrsets, the right side winning on non-attrset values.
    recursiveUpdate = lhs: rhs:
      lhs // builtins.mapAttrs
        (name: r: if builtins.isAttrs r && builtins.isAttrs (lhs.${name} or null) && !(lhs.${name} ? _type)
          then recursiveUpdate lhs.${name} r else r)
        rhs;
    types = {
      bool = { name = "bool"; check = builtins.isBool; };
      str = { name = "str"; check = builtins.isString; };
      int = { name = "int"; check = builtins.isInt; };
      package = { name = "package"; check = _: true; };
      anything = { name = "anything"; check = _: true; };
      enum = values: { name = "enum"; check = v: builtins.elem v values; };
      nullOr = t: { name = "nullOr ${t.name}"; check = v: v == null || t.check v; };
      listOf = t: { name = "listOf ${t.name}"; check = v: builtins.isList v && builtins.all t.check v; };
      attrsOf = t: { name = "attrsOf ${t.name}"; check = v: builtins.isAttrs v; };
      either = a: b: { name = "${a.name} or ${b.name}"; check = v: a.check v || b.check v; };
    };
  };

  pkgs = {
    nixcache = "/nix/store/00000000000000000000000000000000-nixcache-0.1.0";
    coreutils = "/nix/store/11111111111111111111111111111111-coreutils";
    # nixpkgs renders TOML from the value; here the value itself is kept (as JSON) so the
    # test can render it with Python and feed it to nixcache's own loader.
    formats.toml = _: { generate = name: value: builtins.toFile name (builtins.toJSON value); };
    writeShellScript = name: text: builtins.toFile name "#!/bin/sh\n${text}";
  };

  # Resolve mkIf / mkMerge the way the module system does for plain values.
  resolve = v:
    if isType "if" v then (if v.condition then resolve v.content else { })
    else if isType "merge" v then builtins.foldl' (acc: c: lib.recursiveUpdate acc (resolve c)) { } v.contents
    else if builtins.isAttrs v && !(v ? _type) then builtins.mapAttrs (_: resolve) v
    else v;

  defaultsOf = opts:
    if isType "option" opts then opts.default or null
    else builtins.mapAttrs (_: defaultsOf) opts;

  # Check user-set values against the declared option types (a type error is an error here too).
  checked = opts: values:
    builtins.mapAttrs
      (name: v:
        let opt = opts.${name} or (throw "The option `${name}' does not exist."); in
        if isType "option" opt then
          (if opt.type.check v then v else throw "The option `${name}' is not of type `${opt.type.name}'.")
        else checked opt v)
      values;

  modules = [ (import ../../module.nix) ] ++ lib.optional seed (import ../../nix/seed-compat.nix);
  options = builtins.foldl' lib.recursiveUpdate { } (map (m: (m { inherit lib pkgs config; }).options) modules);
  base = lib.recursiveUpdate
    (lib.recursiveUpdate (defaultsOf options) {
      networking.hostName = "testhost";
      nix.package = "/nix/store/22222222222222222222222222222222-nix";
    })
    (checked options user);
  round = previous:
    lib.recursiveUpdate base
      (builtins.foldl' lib.recursiveUpdate { }
        (map (m: resolve ((m { inherit lib pkgs; config = previous; }).config or { })) modules));
  config = round (round (round base));

  failed = builtins.filter (a: !a.assertion) (config.assertions or [ ]);
in
{
  assertions = map (a: a.message) failed;
  service = if failed == [ ] then config.systemd.services.nixcache or null else null;
  nixSettings = if failed == [ ] then config.nix.settings or null else null;
  nixcache = if failed == [ ] then builtins.removeAttrs config.services.nixcache [ "package" ] else null;
}
