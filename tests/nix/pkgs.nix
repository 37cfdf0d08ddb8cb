# A small stand-in for nixpkgs' `pkgs`: what module.nix and ./nixos.nix use, nothing else (a
# missing attribute is an evaluation error, as a missing package would be).
#
# Packages are derivation-shaped attribute sets (`lib.isDerivation` holds, so `types.package`
# accepts them and keeps them as they are; "${pkg}" is the store path). Their store paths are
# fake and carry no string context: nothing is built or substituted, and builtins.toFile may
# write text that mentions them. Files (writeText, writeShellScript, formats.toml's generate) are
# written to the store with builtins.toFile (needs --read-write-mode), so tests can read them.
{ lib }:

let
  # Fake store path, its hash part in Nix's base-32 alphabet (no e, o, u, t).
  storePath = name:
    let hash = builtins.substring 0 32 (builtins.hashString "sha256" name); in
    "${builtins.storeDir}/${builtins.replaceStrings [ "e" ] [ "z" ] hash}-${name}";

  drv = name: outPath:
    let
      self = {
        type = "derivation";
        inherit name outPath;
        outputs = [ "out" ];
        out = self;
        outputName = "out";
        meta = { };
      };
    in
    self;

  package = name: drv name (storePath name);
  file = name: text: drv name (builtins.toFile name text);
in
rec {
  nixcache = package "nixcache-0.1.0"; # the flake's overlay provides it
  nix = package "nix-2.28.3";
  bash = package "bash-5.2p37";
  coreutils = package "coreutils-9.5";
  findutils = package "findutils-4.10.0";
  gnugrep = package "gnugrep-3.11";
  gnused = package "gnused-4.9";
  systemd = package "systemd-257.5";

  runtimeShell = "${bash}/bin/bash";

  writeText = file;
  # nixpkgs: writeTextFile { executable = true; text = "#!${runtimeShell}\n${text}\n"; … }
  # (here not executable: builtins.toFile cannot set the mode).
  writeShellScript = name: text: file name "#!${runtimeShell}\n${text}\n";
  # The script would be $out/bin/<name>; a store directory cannot be made without building, so
  # this one is a fake path (unused by module.nix: only systemd's script/preStart/… options use it).
  writeShellScriptBin = name: _text: package name;

  formats.toml = { }: {
    # pkgs/pkgs-lib/formats.nix, as in nixpkgs.
    type =
      let
        valueType = lib.types.oneOf [
          lib.types.bool
          lib.types.int
          lib.types.float
          lib.types.str
          lib.types.path
          (lib.types.attrsOf valueType)
          (lib.types.listOf valueType)
        ] // {
          description = "TOML value";
        };
      in
      valueType;
    # nixpkgs runs `json2toml` on builtins.toJSON value; the file here holds that JSON (the
    # tests render it as TOML and load it with nixcache's own loader).
    generate = name: value: file name (builtins.toJSON value);
  };
}
