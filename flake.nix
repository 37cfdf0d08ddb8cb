{
  description = "nixcache: a Nix binary cache in any S3 bucket, garbage-collected by GC roots";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      module = import ./module.nix;
    in
    {
      overlays.default = final: _prev: { nixcache = final.callPackage ./nix/package.nix { }; };

      packages = forAll (pkgs: rec {
        nixcache = pkgs.callPackage ./nix/package.nix { };
        default = nixcache;
      });

      nixosModules = {
        default = { pkgs, ... }: {
          imports = [ module ];
          nixpkgs.overlays = [ self.overlays.default ];
        };
        nixcache = self.nixosModules.default;
        # The original project's module name and options, mapped onto services.nixcache.
        my-own-cache-with-blackjack-and-hooks = {
          imports = [ self.nixosModules.default ./nix/seed-compat.nix ];
        };
      };

      checks = forAll (pkgs: {
        package = self.packages.${pkgs.system}.default;
        module-eval = (nixpkgs.lib.nixosSystem {
          inherit (pkgs) system;
          modules = [
            self.nixosModules.default
            {
              boot.isContainer = true;
              services.nixcache = {
                enable = true;
                bucket = "nix-cache";
                endpoint = "https://s3.example.org";
                signingKeyFile = "/etc/nixcache/signing.key";
                publicKey = "example-1:XPnWsxF43W5WV9nl6TFA1EhYkehVMIZOs20wu4f8A5c=";
              };
              system.stateVersion = "24.11";
            }
          ];
        }).config.system.build.toplevel;
      });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (ps: with ps; [
              aiobotocore asyncinotify structlog pydantic zstandard cryptography
              pytest moto mypy types-aiobotocore
            ]))
            pkgs.ruff
            pkgs.seaweedfs
          ];
        };
      });
    };
}
