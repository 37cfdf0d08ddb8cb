# The NixOS options module.nix reads or sets, declared with the types NixOS gives them, plus the
# parts of NixOS's own config that act on them (defaults of nix.settings, the unit PATH, rendering
# of systemd units, systemd's warnings). Adapted from nixpkgs (MIT):
#   nixos/modules/misc/assertions.nix              assertions, warnings
#   nixos/modules/tasks/network-interfaces.nix     networking.hostName
#   nixos/modules/services/system/nix-daemon.nix   nix.enable, nix.package
#   nixos/modules/config/nix.nix                   nix.settings
#   nixos/modules/system/boot/systemd.nix          systemd.{package,globalEnvironment,services,units}
#   nixos/lib/systemd-{lib,types,unit-options}.nix the unit submodules and their checks
# Option descriptions are left out. Whatever is not declared here does not exist: module.nix
# setting anything else fails with the module system's "The option `…' does not exist.", as it
# would on a NixOS without the module declaring it — add the declaration here, as NixOS has it.
{ config, lib, pkgs, ... }:

let
  inherit (lib)
    concatLists concatMap concatMapStrings concatStrings concatStringsSep const elem filterOverrides
    isList isPath makeBinPath makeSearchPathOutput mapAttrs mapAttrs' mapAttrsToList mergeEqualOption
    mkAfter mkDefault mkIf mkMerge mkOption mkOptionDefault nameValuePair optional optionalAttrs
    optionalString replaceStrings stringLength toList types;
  cfg = config.systemd;

  ## nixos/lib/systemd-lib.nix

  unitNameType = types.strMatching
    "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  shellEscape = s: replaceStrings [ "\\" ] [ "\\\\" ] s;

  assertValueOneOf = name: values: group: attr:
    optional (attr ? ${name} && !elem attr.${name} values)
      "Systemd ${group} field `${name}' cannot have value `${toString attr.${name}}'.";

  checkUnitConfig = group: checks: attrs:
    let
      defs = mapAttrs (const (v:
        if v._type or "" == "override" then v.content
        else if v._type or "" == "if" then v.content
        else v)) attrs;
      errors = concatMap (c: c group defs) checks;
    in
    if errors == [ ] then true else builtins.trace (concatStringsSep "\n" errors) false;

  # nixpkgs: writeShellScriptBin (or writeShellApplication with strict checks), renamed.
  makeJobScript = { name, text, enableStrictShellChecks }:
    let scriptName = replaceStrings [ "\\" "@" ] [ "-" "_" ] (shellEscape name); in
    "${pkgs.writeShellScriptBin scriptName "set -e\n\n${text}\n"}/bin/${scriptName}";

  unitConfig = { config, name, options, ... }: {
    config.unitConfig =
      optionalAttrs (config.requires != [ ]) { Requires = toString config.requires; }
      // optionalAttrs (config.wants != [ ]) { Wants = toString config.wants; }
      // optionalAttrs (config.upholds != [ ]) { Upholds = toString config.upholds; }
      // optionalAttrs (config.after != [ ]) { After = toString config.after; }
      // optionalAttrs (config.before != [ ]) { Before = toString config.before; }
      // optionalAttrs (config.bindsTo != [ ]) { BindsTo = toString config.bindsTo; }
      // optionalAttrs (config.partOf != [ ]) { PartOf = toString config.partOf; }
      // optionalAttrs (config.conflicts != [ ]) { Conflicts = toString config.conflicts; }
      // optionalAttrs (config.requisite != [ ]) { Requisite = toString config.requisite; }
      // optionalAttrs (config ? restartTriggers && config.restartTriggers != [ ]) {
        X-Restart-Triggers = "${pkgs.writeText "X-Restart-Triggers-${name}"
          (toString (map (x: if isPath x then "${x}" else x) (lib.flatten config.restartTriggers)))}";
      }
      // optionalAttrs (config ? reloadTriggers && config.reloadTriggers != [ ]) {
        X-Reload-Triggers = "${pkgs.writeText "X-Reload-Triggers-${name}"
          (toString (map (x: if isPath x then "${x}" else x) (lib.flatten config.reloadTriggers)))}";
      }
      // optionalAttrs (config.description != "") { Description = config.description; }
      // optionalAttrs (config.documentation != [ ]) { Documentation = toString config.documentation; }
      // optionalAttrs (config.onFailure != [ ]) { OnFailure = toString config.onFailure; }
      // optionalAttrs (config.onSuccess != [ ]) { OnSuccess = toString config.onSuccess; }
      // optionalAttrs options.startLimitIntervalSec.isDefined {
        StartLimitIntervalSec = toString config.startLimitIntervalSec;
      }
      // optionalAttrs options.startLimitBurst.isDefined { StartLimitBurst = toString config.startLimitBurst; };
  };

  serviceConfig = { name, config, ... }: {
    config = {
      name = "${name}.service";
      environment.PATH = mkIf (config.path != [ ])
        "${makeBinPath config.path}:${makeSearchPathOutput "bin" "sbin" config.path}";
      enableStrictShellChecks = mkOptionDefault cfg.enableStrictShellChecks;
    };
  };

  stage2ServiceConfig = {
    imports = [ serviceConfig ];
    # Default path for systemd services. Should be quite minimal.
    config.path = mkAfter [ pkgs.coreutils pkgs.findutils pkgs.gnugrep pkgs.gnused cfg.package ];
  };

  toOption = x: if x == true then "true" else if x == false then "false" else toString x;

  attrsToSection = as: concatStrings (concatLists (mapAttrsToList
    (name: value: map (x: "${name}=${toOption x}\n") (if isList value then value else [ value ]))
    as));

  commonUnitText = def: lines:
    ''
      [Unit]
      ${attrsToSection def.unitConfig}
    ''
    + lines
    + optionalString (def.wantedBy != [ ]) ''

      [Install]
      WantedBy=${concatStringsSep " " def.wantedBy}
    '';

  serviceToUnit = def: {
    inherit (def) name aliases wantedBy requiredBy upheldBy enable overrideStrategy;
    text = commonUnitText def (
      "[Service]\n"
      + (let env = cfg.globalEnvironment // def.environment; in
        concatMapStrings (n:
          let s = optionalString (env.${n} != null) "Environment=${builtins.toJSON "${n}=${env.${n}}"}\n"; in
          if stringLength s >= 1048576
          then throw "The value of the environment variable ‘${n}’ in systemd service ‘${def.name}.service’ is too long."
          else s)
          (builtins.attrNames env))
      + (if def.reloadIfChanged then "X-ReloadIfChanged=true\n"
         else if !def.restartIfChanged then "X-RestartIfChanged=false\n"
         else "")
      + optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
      + optionalString def.notSocketActivated "X-NotSocketActivated=true\n"
      + attrsToSection def.serviceConfig
    );
  };

  ## nixos/lib/systemd-unit-options.nix

  checkService = checkUnitConfig "Service" [
    (assertValueOneOf "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ])
    (assertValueOneOf "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ])
  ];

  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = filterOverrides defs; in
      if lib.any (def: isList def.value) defs'
      then concatMap (def: toList def.value) defs'
      else mergeEqualOption loc defs';
  };

  unitNames = mkOption { default = [ ]; type = types.listOf unitNameType; };
  lines = mkOption { type = types.lines; default = ""; };

  sharedOptions = {
    enable = mkOption { default = true; type = types.bool; };
    name = mkOption { type = types.str; };
    overrideStrategy = mkOption { default = "asDropinIfExists"; type = types.enum [ "asDropinIfExists" "asDropin" ]; };
    requiredBy = unitNames;
    upheldBy = unitNames;
    wantedBy = unitNames;
    aliases = unitNames;
  };

  concreteUnitOptions = sharedOptions // {
    text = mkOption { type = types.nullOr types.str; default = null; };
    # `unit` (the built unit file, pkgs.runCommand) is left out: nothing is built here.
  };

  commonUnitOptions = {
    options = sharedOptions // {
      description = mkOption { default = ""; type = types.singleLineStr; };
      documentation = mkOption { default = [ ]; type = types.listOf types.str; };
      requires = unitNames;
      wants = unitNames;
      upholds = unitNames;
      after = unitNames;
      before = unitNames;
      bindsTo = unitNames;
      partOf = unitNames;
      conflicts = unitNames;
      requisite = unitNames;
      unitConfig = mkOption { default = { }; type = types.attrsOf unitOption; };
      onFailure = unitNames;
      onSuccess = unitNames;
      startLimitBurst = mkOption { type = types.int; };
      startLimitIntervalSec = mkOption { type = types.int; };
    };
  };

  stage2CommonUnitOptions = {
    imports = [ commonUnitOptions ];
    options = {
      restartTriggers = mkOption { default = [ ]; type = types.listOf types.unspecified; };
      reloadTriggers = mkOption { default = [ ]; type = types.listOf unitOption; };
    };
  };

  serviceOptions = { name, config, ... }: {
    options = {
      environment = mkOption { default = { }; type = with types; attrsOf (nullOr (oneOf [ str path package ])); };
      path = mkOption { default = [ ]; type = with types; listOf (oneOf [ package str ]); };
      serviceConfig = mkOption { default = { }; type = types.addCheck (types.attrsOf unitOption) checkService; };
      enableStrictShellChecks = mkOption { type = types.bool; };
      script = lines;
      scriptArgs = mkOption { type = types.str; default = ""; };
      preStart = lines;
      postStart = lines;
      reload = lines;
      preStop = lines;
      postStop = lines;
      jobScripts = mkOption { type = with types; coercedTo path lib.singleton (listOf path); default = [ ]; };
    };
    config = mkMerge [
      (mkIf (config.preStart != "") rec {
        jobScripts = makeJobScript { name = "${name}-pre-start"; text = config.preStart; inherit (config) enableStrictShellChecks; };
        serviceConfig.ExecStartPre = [ jobScripts ];
      })
      (mkIf (config.script != "") rec {
        jobScripts = makeJobScript { name = "${name}-start"; text = config.script; inherit (config) enableStrictShellChecks; };
        serviceConfig.ExecStart = jobScripts + " " + config.scriptArgs;
      })
      (mkIf (config.postStart != "") rec {
        jobScripts = makeJobScript { name = "${name}-post-start"; text = config.postStart; inherit (config) enableStrictShellChecks; };
        serviceConfig.ExecStartPost = [ jobScripts ];
      })
      (mkIf (config.reload != "") rec {
        jobScripts = makeJobScript { name = "${name}-reload"; text = config.reload; inherit (config) enableStrictShellChecks; };
        serviceConfig.ExecReload = jobScripts;
      })
      (mkIf (config.preStop != "") rec {
        jobScripts = makeJobScript { name = "${name}-pre-stop"; text = config.preStop; inherit (config) enableStrictShellChecks; };
        serviceConfig.ExecStop = jobScripts;
      })
      (mkIf (config.postStop != "") rec {
        jobScripts = makeJobScript { name = "${name}-post-stop"; text = config.postStop; inherit (config) enableStrictShellChecks; };
        serviceConfig.ExecStopPost = jobScripts;
      })
    ];
  };

  stage2ServiceOptions = {
    imports = [ stage2CommonUnitOptions serviceOptions ];
    options = {
      restartIfChanged = mkOption { type = types.bool; default = true; };
      reloadIfChanged = mkOption { type = types.bool; default = false; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
      notSocketActivated = mkOption { type = types.bool; default = false; };
      startAt = mkOption {
        type = with types; either str (listOf str);
        default = [ ];
        apply = v: if isList v then v else [ v ];
      };
    };
  };

  ## nixos/modules/config/nix.nix

  semanticConfType = with types;
    let
      confAtom = nullOr (oneOf [ bool int float str path package ]) // {
        description = "Nix config atom (null, bool, int, float, str, path or package)";
      };
    in
    attrsOf (either confAtom (listOf confAtom));
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; internal = true; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; internal = true; default = [ ]; };

    networking.hostName = mkOption {
      default = "nixos"; # config.system.nixos.distroId
      type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
    };

    nix = {
      enable = mkOption { type = types.bool; default = true; };
      package = mkOption { type = types.package; default = pkgs.nix; };
      settings = mkOption {
        default = { };
        type = types.submodule {
          freeformType = semanticConfType;
          options = {
            max-jobs = mkOption { type = types.either types.int (types.enum [ "auto" ]); default = "auto"; };
            auto-optimise-store = mkOption { type = types.bool; default = false; };
            cores = mkOption { type = types.int; default = 0; };
            sandbox = mkOption { type = types.either types.bool (types.enum [ "relaxed" ]); default = true; };
            extra-sandbox-paths = mkOption { type = types.listOf types.str; default = [ ]; };
            substituters = mkOption { type = types.listOf types.str; };
            trusted-substituters = mkOption { type = types.listOf types.str; default = [ ]; };
            require-sigs = mkOption { type = types.bool; default = true; };
            trusted-public-keys = mkOption { type = types.listOf types.str; };
            trusted-users = mkOption { type = types.listOf types.str; };
            system-features = mkOption { type = types.listOf types.str; };
            allowed-users = mkOption { type = types.listOf types.str; default = [ "*" ]; };
          };
        };
      };
    };

    systemd = {
      package = mkOption { type = types.package; default = pkgs.systemd; };
      globalEnvironment = mkOption {
        type = with types; attrsOf (nullOr (oneOf [ str path package ]));
        default = { };
      };
      enableStrictShellChecks = mkOption { type = types.bool; default = false; };
      services = mkOption {
        default = { };
        type = types.attrsOf (types.submodule [ stage2ServiceOptions unitConfig stage2ServiceConfig ]);
      };
      units = mkOption {
        default = { };
        type = types.attrsOf (types.submodule ({ name, ... }: {
          options = concreteUnitOptions;
          config.name = mkDefault name;
        }));
      };
    };
  };

  config = mkMerge [
    (mkIf config.nix.enable {
      nix.settings = {
        trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
        trusted-users = [ "root" ];
        substituters = mkAfter [ "https://cache.nixos.org/" ];
        system-features = mkDefault [ "nixos-test" "benchmark" "big-parallel" "kvm" ];
      };
    })
    {
      systemd.units = mapAttrs' (_: def: nameValuePair def.name (serviceToUnit def)) cfg.services;

      warnings =
        concatLists (mapAttrsToList
          (name: service:
            let
              type = service.serviceConfig.Type or "";
              restart = service.serviceConfig.Restart or "no";
            in
            optional (type == "oneshot" && (restart == "always" || restart == "on-success"))
              "Service '${name}.service' with 'Type=oneshot' cannot have 'Restart=always' or 'Restart=on-success'"
            ++ optional (service.serviceConfig ? StartLimitInterval)
              "Service '${name}.service' uses the attribute 'StartLimitInterval' in the Service section, which is deprecated. See https://github.com/NixOS/nixpkgs/issues/45786."
            ++ optional (service.reloadIfChanged && service.reloadTriggers != [ ])
              "Service '${name}.service' has both 'reloadIfChanged' and 'reloadTriggers' set. This is probably not what you want, because 'reloadTriggers' behave the same whay as 'restartTriggers' if 'reloadIfChanged' is set.")
          cfg.services)
        ++ concatLists (mapAttrsToList
          (name: def: optional
            (elem "network-online.target" def.after
              && !(elem "network-online.target" (def.wants ++ def.requires ++ def.bindsTo)))
            "${name}.service is ordered after 'network-online.target' but doesn't depend on it")
          cfg.services);
    }
  ];
}
