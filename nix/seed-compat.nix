# The original project's options (github:hugosenari/nixos-config?dir=cache), mapped onto
# services.nixcache so its README's example keeps working.
{ config, lib, ... }:

let
  inherit (lib) mkOption mkIf types;
  old = config.my-own-cache-with-blackjack-and-hooks;
  withScheme = host: if lib.hasPrefix "http://" host || lib.hasPrefix "https://" host then host else "https://${host}";
in
{
  options.my-own-cache-with-blackjack-and-hooks = {
    enable = mkOption { type = types.bool; default = false; description = "Enable (maps to services.nixcache.enable)."; };
    s3-bucket = mkOption { type = types.str; default = "nixstore"; description = "Maps to services.nixcache.bucket."; };
    s3-cred = mkOption { type = types.str; description = "Maps to services.nixcache.credentialsFile."; };
    s3-profile = mkOption { type = types.nullOr types.str; default = null; description = "Maps to services.nixcache.profile."; };
    s3-end = mkOption { type = types.str; description = "Endpoint host (scheme optional); maps to services.nixcache.endpoint."; };
    sig-prv = mkOption { type = types.str; description = "Maps to services.nixcache.signingKeyFile."; };
    sig-pub = mkOption { type = types.str; description = "Maps to services.nixcache.publicKey."; };
  };

  config = mkIf old.enable {
    services.nixcache = {
      enable = true;
      bucket = old.s3-bucket;
      credentialsFile = old.s3-cred;
      profile = old.s3-profile;
      endpoint = withScheme old.s3-end;
      signingKeyFile = old.sig-prv;
      publicKey = old.sig-pub;
    };
  };
}
