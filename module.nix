# NixOS module for nixcache: one hardened systemd service, the post-build hook, and
# (optionally) the bucket as a substituter. Options mirror the TOML config (README).
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.nixcache;
  credentials = "/run/credentials/nixcache.service";
  stateDir = "/var/lib/nixcache";
  fifo = "/run/nixcache/hook.fifo";
  nullOr = types.nullOr;
  dropNulls = lib.filterAttrs (_: v: v != null);

  settings = lib.recursiveUpdate
    (dropNulls {
      hostname = cfg.hostname;
      state_dir = stateDir;
      inherit fifo;
      gcroots_dir = cfg.gcrootsDir;
      s3 = dropNulls {
        inherit (cfg) bucket endpoint region profile;
        credentials_file = if cfg.credentialsFile == null then null else "${credentials}/s3-credentials";
        addressing_style = cfg.addressingStyle;
      };
      signing.secret_key_file = "${credentials}/signing-key";
      upload = dropNulls {
        inherit (cfg) workers compression priority;
        compression_level = cfg.compressionLevel;
        skip_signed_by = cfg.skipSignedBy;
      };
      roots = { inherit (cfg.roots) include exclude keep; };
      gc = dropNulls {
        dereference = cfg.dereference.enable;
        dereference_interval = cfg.dereference.interval;
        collect = cfg.collect.enable;
        collect_interval = cfg.collect.interval;
        grace_period = cfg.gracePeriod;
        residual_age = cfg.residualAge;
      };
    } // lib.optionalAttrs cfg.substituter.enable {
      substituter.listen = "127.0.0.1:${toString cfg.substituter.port}";
    })
    cfg.settings;

  configFile = (pkgs.formats.toml { }).generate "nixcache.toml" settings;

  hook = pkgs.writeShellScript "nixcache-post-build-hook" ''
    NIXCACHE_FIFO=${fifo} NIXCACHE_SPOOL=${stateDir}/spool exec ${cfg.package}/libexec/nixcache/post-build-hook
  '';

  duration = types.either types.int types.str;
in
{
  options.services.nixcache = {
    enable = mkEnableOption "nixcache, a Nix binary cache in an S3 bucket, garbage-collected by GC roots";

    package = mkOption {
      type = types.package;
      default = pkgs.nixcache;
      description = "The nixcache package (the flake's overlay provides pkgs.nixcache).";
    };

    bucket = mkOption {
      type = nullOr types.str;
      default = null;
      description = "Bucket name (required).";
    };
    endpoint = mkOption {
      type = nullOr types.str;
      default = null;
      example = "https://s3.us-west-004.backblazeb2.com";
      description = "Endpoint URL of an S3-compatible provider; null means AWS.";
    };
    region = mkOption { type = types.str; default = "us-east-1"; description = "Region."; };
    profile = mkOption {
      type = nullOr types.str;
      default = null;
      description = "Profile in the credentials file.";
    };
    credentialsFile = mkOption {
      type = nullOr types.str;
      default = null;
      example = "/etc/nixcache/credentials";
      description = ''
        AWS-style shared credentials file. A string, not a path, so the secret never enters the
        Nix store; passed to the service with LoadCredential.
      '';
    };
    addressingStyle = mkOption {
      type = types.enum [ "path" "virtual" "auto" ];
      default = "path";
      description = "S3 addressing style.";
    };
    signingKeyFile = mkOption {
      type = nullOr types.str;
      default = null;
      example = "/etc/nixcache/signing.key";
      description = "Secret key from `nix-store --generate-binary-cache-key` (a string: kept out of the store; LoadCredential).";
    };
    publicKey = mkOption {
      type = nullOr types.str;
      default = null;
      example = "my-cache-1:XPnWsxF43W5WV9nl6TFA1EhYkehVMIZOs20wu4f8A5c=";
      description = "The public half of signingKeyFile, trusted when useAsSubstituter is set.";
    };
    hostname = mkOption {
      type = types.str;
      default = config.networking.hostName;
      description = "This host's folder in the bucket (gcroots/<hostname>/).";
    };
    gcrootsDir = mkOption { type = types.str; default = "/nix/var/nix/gcroots"; description = "GC roots to watch."; };

    compression = mkOption { type = types.enum [ "zstd" "xz" "none" ]; default = "zstd"; description = "NAR compression."; };
    compressionLevel = mkOption { type = nullOr (types.ints.between 0 22); default = null; description = "Compression level (zstd 3, xz 6 when null)."; };
    workers = mkOption { type = types.ints.between 1 64; default = 4; description = "Concurrent uploads."; };
    skipSignedBy = mkOption {
      type = types.listOf types.str;
      default = [ "cache.nixos.org-1" ];
      description = "Paths signed by these keys are upstream and never uploaded.";
    };
    priority = mkOption { type = types.ints.unsigned; default = 40; description = "Priority in nix-cache-info."; };

    roots = {
      include = mkOption { type = types.listOf types.str; default = [ "*" ]; description = "Globs selecting the roots to publish."; };
      exclude = mkOption { type = types.listOf types.str; default = [ "*nixos-rebuild*" ]; description = "Globs of roots never published."; };
      keep = mkOption { type = types.listOf types.str; default = [ ]; description = "Globs of published roots never moved to the trash."; };
    };
    dereference = {
      enable = mkOption { type = types.bool; default = true; description = "Trash the gcinfos of roots gone from this host."; };
      interval = mkOption { type = duration; default = "30m"; description = "Dereference period."; };
    };
    collect = {
      enable = mkOption { type = types.bool; default = true; description = "Collect the bucket's trash."; };
      interval = mkOption { type = duration; default = "1h"; description = "Collection period."; };
    };
    gracePeriod = mkOption { type = duration; default = "1d"; description = "Nothing written within it is collected."; };
    residualAge = mkOption { type = nullOr duration; default = null; description = "Also delete residual objects older than this."; };

    useAsSubstituter = mkOption {
      type = types.bool;
      default = true;
      description = "Add the bucket to nix.settings.substituters and publicKey to trusted-public-keys.";
    };
    substituterUrl = mkOption {
      type = types.str;
      default =
        if cfg.substituter.enable then "http://127.0.0.1:${toString cfg.substituter.port}"
        else if cfg.endpoint != null then "${cfg.endpoint}/${toString cfg.bucket}"
        else "https://${toString cfg.bucket}.s3.${cfg.region}.amazonaws.com";
      description = ''
        The URL clients substitute from: the bucket itself (it must allow anonymous reads), or
        the service's own substituter when substituter.enable is set.
      '';
    };
    substituter = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Serve the bucket to this host's Nix from the service, with the service's credentials, on
          127.0.0.1:port: for a private bucket (no anonymous reads). substituterUrl then points there.
        '';
      };
      port = mkOption { type = types.port; default = 37515; description = "Loopback port of the substituter."; };
    };

    settings = mkOption {
      type = types.attrsOf types.anything;
      default = { };
      example = { upload.part_size_mb = 32; roots.debounce = "5s"; };
      description = "Free-form TOML settings, merged over the ones the options above produce.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      { assertion = cfg.bucket != null; message = "services.nixcache.bucket must be set."; }
      { assertion = cfg.signingKeyFile != null; message = "services.nixcache.signingKeyFile must be set (nix-store --generate-binary-cache-key)."; }
      { assertion = !cfg.useAsSubstituter || cfg.publicKey != null; message = "services.nixcache.publicKey must be set when useAsSubstituter is true."; }
    ];

    nix.settings = {
      post-build-hook = "${hook}";
    } // lib.optionalAttrs cfg.useAsSubstituter {
      substituters = [ cfg.substituterUrl ];
      trusted-public-keys = [ cfg.publicKey ];
    };

    systemd.services.nixcache = {
      description = "nixcache: push builds to the binary cache bucket, publish GC roots, collect";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nix-daemon.service" ];
      wants = [ "network-online.target" ];
      path = [ config.nix.package ];
      # Store queries and the roots listing go through nix-daemon (it runs as root, and it lists the
      # roots in homes this unprivileged service cannot enter: docs/nixos.md, "What the service reads").
      environment = { HOME = stateDir; XDG_CACHE_HOME = "${stateDir}/cache"; NIX_REMOTE = "daemon"; };
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        WatchdogSec = 120;
        ExecStart = "${cfg.package}/bin/nixcache serve --config ${configFile}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = 5;
        TimeoutStopSec = 60;
        LoadCredential = [ "signing-key:${toString cfg.signingKeyFile}" ]
          ++ lib.optional (cfg.credentialsFile != null) "s3-credentials:${cfg.credentialsFile}";
        DynamicUser = true;
        StateDirectory = "nixcache";
        RuntimeDirectory = "nixcache";
        RuntimeDirectoryMode = "0755";
        # Hardening that still lets it read the store, GC roots and out-links in homes.
        ProtectSystem = "strict";
        ProtectHome = "read-only";
        PrivateTmp = true;
        PrivateDevices = true;
        NoNewPrivileges = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        CapabilityBoundingSet = "";
        UMask = "0077";
      };
    };
  };
}
