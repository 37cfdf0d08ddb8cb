# The nixcache application, built from this source tree with nixpkgs' Python packages.
{ lib, python3 }:

python3.pkgs.buildPythonApplication {
  pname = "nixcache";
  version = "0.1.0";
  pyproject = true;
  src = lib.cleanSource ../.;

  build-system = [ python3.pkgs.setuptools ];
  dependencies = with python3.pkgs; [
    aiobotocore
    aiohttp
    asyncinotify
    structlog
    pydantic
    zstandard
    cryptography
    prometheus-client
    tomli-w
  ];

  # The post-build hook runs after every build: start it with `python -S` (no site-packages
  # start-up), which the hook supports by putting its own package on sys.path.
  postInstall = ''
    mkdir -p $out/libexec/nixcache
    cat > $out/libexec/nixcache/post-build-hook <<HOOK
    #!/bin/sh
    exec ${python3.interpreter} -S -E -s $out/${python3.sitePackages}/nixcache/local/hook.py
    HOOK
    chmod +x $out/libexec/nixcache/post-build-hook
  '';

  # The test suite needs a Nix store, SeaweedFS and moto servers: it runs in CI (.ci/run).
  doCheck = false;
  pythonImportsCheck = [ "nixcache" "nixcache.cli" "nixcache.daemon.service" ];

  meta = {
    description = "A Nix binary cache in any S3 bucket, garbage-collected by GC roots";
    license = lib.licenses.mit;
    mainProgram = "nixcache";
    platforms = lib.platforms.linux;
  };
}
