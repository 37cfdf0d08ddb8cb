"""nixcache as NixOS's module runs it: an unprivileged service user beside a real nix-daemon.

The test process is root. It starts its own ``nix-daemon`` (its nix.conf names the post-build
hook, so the hook is run by the daemon, for builds clients ask for with ``NIX_REMOTE=daemon``)
and runs ``nixcache serve`` as a system user with what module.nix's unit gives the service:
``NIX_REMOTE=daemon``, ``HOME`` = its state directory (0700, its own), the FIFO in a 0755 runtime
directory, the key and credentials readable by it alone (LoadCredential), ``UMask=0077``.

That user cannot read root's Python (under /root, 0700), so the service runs in a venv of
Debian's ``/usr/bin/python3`` under /var/tmp, with a world-readable copy of the package on
``PYTHONPATH`` (what is under test now, not what was installed). The venv holds only the
runtime dependencies, pinned to the versions the rest of the suite runs with, and is built
once per set of requirements.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import grp
import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY
from tests.harness import DERIVATIONS, NIX, Bucket, Daemon, wait_until, write_config

REPO = Path(__file__).resolve().parent.parent
SERVICE_USER = "nixcache-test"
NIX_USERS = "nix-users"
"""Debian's nix-bin: the daemon socket's directory is ``root:nix-users 0770``. On NixOS the
socket is reachable by every user (``allowed-users = *``), so the module's DynamicUser needs no
group; here the service user gets this supplementary group to reach it."""
DAEMON_SOCKET = Path("/nix/var/nix/daemon-socket/socket")
SYSTEM_PYTHON = Path("/usr/bin/python3")
VENV_ROOT = Path("/var/tmp")
PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
_PR_SET_PDEATHSIG = 1
RETRY_INTERVAL = 1.0
"""``upload.retry_interval``: seconds between attempts at a path whose push failed."""


def ensure_service_user() -> pwd.struct_passwd:
    """The system user the service runs as, in ``nix-users`` (created once per machine)."""
    try:
        grp.getgrnam(NIX_USERS)
    except KeyError:
        raise AssertionError(f"group {NIX_USERS} missing: is Debian's nix-bin installed?") from None
    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "--groups", NIX_USERS, SERVICE_USER],
            check=True, capture_output=True,
        )  # fmt: skip
        user = pwd.getpwnam(SERVICE_USER)
    if SERVICE_USER not in grp.getgrnam(NIX_USERS).gr_mem:
        subprocess.run(["usermod", "--append", "--groups", NIX_USERS, SERVICE_USER], check=True, capture_output=True)
    return user


def runtime_requirements() -> list[str]:
    """pyproject's runtime dependencies, pinned to the versions installed beside the tests."""
    deps: list[str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = []
    for spec in deps:
        name = re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(spec)
    return pinned


def service_python() -> Path:
    """A venv of /usr/bin/python3 the service user can run, with nixcache's dependencies.

    Cached under /var/tmp by a hash of pyproject.toml, the pinned requirements and the
    interpreter's version; built under a lock, complete only once its marker is written."""
    reqs = runtime_requirements()
    version = subprocess.run([str(SYSTEM_PYTHON), "--version"], check=True, capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([(REPO / "pyproject.toml").read_text(), *reqs, version]).encode()).hexdigest()
    venv = VENV_ROOT / f"nixcache-test-venv-{key[:16]}"
    python = venv / "bin" / "python3"
    marker = venv / ".complete"
    with (VENV_ROOT / "nixcache-test-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            shutil.rmtree(venv, ignore_errors=True)
            made = subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], capture_output=True, text=True,
                                  umask=0o022)  # fmt: skip
            assert made.returncode == 0, (
                f"{SYSTEM_PYTHON} -m venv failed (apt-get install python3-venv): {made.stderr[-2000:]}"
            )
            pip = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check", *reqs],
                capture_output=True, text=True, umask=0o022,
            )  # fmt: skip
            assert pip.returncode == 0, f"pip install {reqs} failed: {pip.stderr[-3000:]}"
            marker.write_text("\n".join(reqs) + "\n")
    return python


def as_user(user: pwd.struct_passwd) -> dict[str, Any]:
    """subprocess arguments running a command as ``user`` (with ``nix-users``), as systemd would."""
    return {
        "user": user.pw_uid,
        "group": user.pw_gid,
        "extra_groups": [grp.getgrnam(NIX_USERS).gr_gid],
        "umask": 0o077,  # the unit's UMask=0077
        "cwd": "/",
    }


def snapshot_package(dest: Path) -> Path:
    """A world-readable copy of the nixcache package under ``dest``; returns the PYTHONPATH entry."""
    shutil.copytree(REPO / "nixcache", dest / "nixcache", ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, files in os.walk(dest):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return dest


def world_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


@dataclass(frozen=True)
class ServiceEnv:
    """What every test shares: the user, its interpreter, the package it runs."""

    user: pwd.struct_passwd
    python: Path
    pythonpath: Path
    root: Path
    """A world-traversable directory (pytest's tmp_path is 0700) holding each test's files."""

    def check(self) -> None:
        """The service user can import the daemon (a root umask of 077 would hide the venv)."""
        imported = subprocess.run(
            [str(self.python), "-c", "import nixcache.cli, nixcache.daemon.service"], capture_output=True, text=True,
            env={"PATH": PATH, "PYTHONPATH": str(self.pythonpath)}, **as_user(self.user),
        )  # fmt: skip
        assert imported.returncode == 0, f"{SERVICE_USER} cannot run {self.python}: {imported.stderr[-2000:]}"


@dataclass(frozen=True)
class Service:
    """One test's service: its directories, config and hook, laid out as the unit does."""

    env: ServiceEnv
    base: Path
    state_dir: Path
    run_dir: Path
    config: Path
    hook: Path
    nix_conf_dir: Path

    @property
    def fifo(self) -> Path:
        return self.run_dir / "hook.fifo"

    @property
    def pending(self) -> list[str]:
        return sorted(p.name for p in (self.state_dir / "pending").iterdir() if not p.name.startswith("."))

    @property
    def spooled(self) -> list[str]:
        spool = self.state_dir / "spool"
        return sorted(p.name for p in spool.iterdir()) if spool.exists() else []

    def environment(self) -> dict[str, str]:
        """The unit's environment (module.nix), plus the interpreter's search path."""
        return {
            "PATH": PATH,
            "HOME": str(self.state_dir),
            "XDG_CACHE_HOME": str(self.state_dir / "cache"),
            "NIX_REMOTE": "daemon",
            "NIX_CONF_DIR": str(self.nix_conf_dir),  # NixOS: one /etc/nix/nix.conf for all
            "PYTHONPATH": str(self.env.pythonpath),
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``nixcache ARGS --config …`` as the service user (e.g. ``systemd-run -p User=…``)."""
        return subprocess.run(
            [str(self.env.python), "-m", "nixcache.cli", *args, "--config", str(self.config)],
            capture_output=True, text=True, env=self.environment(), timeout=120, **as_user(self.env.user),
        )  # fmt: skip

    def daemon(self, log: Path) -> ServiceDaemon:
        return ServiceDaemon(self, log)


def lay_out_service(env: ServiceEnv, base: Path, bucket: Bucket, secret_key: Path) -> Service:
    """The unit's directories and files under ``base`` (world-traversable), and the config.

    ``StateDirectory``: 0700, the user's. ``RuntimeDirectory`` (the FIFO's): 0755, the user's.
    ``LoadCredential``: a directory only the user can read. The config and the hook script
    are world-readable, as they are in the Nix store."""
    uid, gid = env.user.pw_uid, env.user.pw_gid
    world_dir(base)
    state = world_dir(base / "state", 0o700)
    run = world_dir(base / "run")
    creds = world_dir(base / "credentials", 0o500)
    for d in (state, run, creds):
        os.chown(d, uid, gid)
    shutil.copyfile(secret_key, creds / "signing-key")
    (creds / "s3-credentials").write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    for f in ("signing-key", "s3-credentials"):
        os.chown(creds / f, uid, gid)
        (creds / f).chmod(0o400)
    settings: dict[str, Any] = {
        # What module.nix renders; gcroots_dir and profiles_dir keep their defaults (the real ones).
        "hostname": "testhost",
        "state_dir": str(state),
        "fifo": str(run / "hook.fifo"),
        "s3": {
            "bucket": bucket.name, "endpoint": bucket.endpoint, "addressing_style": "path",
            "credentials_file": str(creds / "s3-credentials"), "max_attempts": 3, "connect_timeout": 2,
        },
        "signing": {"secret_key_file": str(creds / "signing-key")},
        "upload": {"workers": 4, "compression": "zstd", "retry_interval": RETRY_INTERVAL, "spool_interval": 1},
        # Only this test's roots: the gcroots dir is the machine's, shared with other tests.
        "roots": {"include": [f"{base}/*"], "exclude": ["*nixos-rebuild*"], "debounce": 0.2, "rescan_interval": 1},
        "gc": {"dereference": True, "dereference_interval": 1, "collect": True, "collect_interval": 3600},
    }  # fmt: skip
    config = write_config(world_dir(base / "etc") / "nixcache.toml", settings)
    config.chmod(0o644)
    hook = base / "etc" / "post-build-hook"
    made = subprocess.run(
        [str(env.python), "-m", "nixcache.cli", "hook-script", "--config", str(config), str(hook)],
        capture_output=True, text=True, env={"PATH": PATH, "PYTHONPATH": str(env.pythonpath)},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    nix_conf_dir = world_dir(base / "nix-conf")
    write_nix_conf(nix_conf_dir, hook)
    return Service(env, base, state, run, config, hook, nix_conf_dir)


def write_nix_conf(conf_dir: Path, hook: Path) -> Path:
    """The daemon's nix.conf: no network substituter (loopback only here: cache.nixos.org would
    be retried for seconds), no sandbox (Debian), the build users if the machine has them."""
    try:
        build_users = "nixbld" if grp.getgrnam("nixbld").gr_mem else ""
    except KeyError:
        build_users = ""
    conf = conf_dir / "nix.conf"
    conf.write_text(
        "sandbox = false\n"
        "substituters =\n"
        f"build-users-group = {build_users}\n"
        "experimental-features = nix-command\n"
        f"post-build-hook = {hook}\n"
    )
    conf.chmod(0o644)
    return conf


class ServiceDaemon(Daemon):
    """``nixcache serve`` as the service user, with the unit's environment."""

    def __init__(self, service: Service, log: Path) -> None:
        super().__init__(service.config, log)
        self.service = service

    def start(self, wait_ready: bool = True, env: dict[str, str] | None = None) -> ServiceDaemon:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        s = self.service
        self.process = subprocess.Popen(
            [str(s.env.python), "-m", "nixcache.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"), stdin=subprocess.DEVNULL,
            env={**s.environment(), **(env or {})}, preexec_fn=_die_with_parent, **as_user(s.env.user),
        )  # fmt: skip
        Daemon.running.append(self)
        if wait_ready:
            self.wait_event("service.ready", 30)
        return self

    def count(self, *names: str) -> int:
        return sum(len(self.events(n)) for n in names)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, even by SIGKILL (no orphan daemon).
    Set after the child's change of user (subprocess calls this last), which would clear it."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def daemon_answers() -> bool:
    """A nix-daemon completes the protocol's handshake on the machine's socket."""
    ping = subprocess.run([*NIX, "store", "ping", "--store", "daemon"], capture_output=True)
    return ping.returncode == 0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (nix-daemon's connection workers start their own sessions,
    so a process group does not hold them; systemd's cgroup does)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        out += children
        frontier = children
    return out


class NixDaemon:
    """A real ``nix-daemon`` on the machine's socket, with its own nix.conf (NIX_CONF_DIR)."""

    def __init__(self, conf_dir: Path, log: Path) -> None:
        self.conf_dir = conf_dir
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NixDaemon:
        assert not daemon_answers(), f"another nix-daemon already answers on {DAEMON_SOCKET}: this test needs its own"
        env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "NIX_CONF_DIR": str(self.conf_dir)}
        self.process = subprocess.Popen(
            ["nix-daemon"], stdin=subprocess.DEVNULL, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            env=env, start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        wait_until(lambda: self._check_alive() and daemon_answers(), 20, "nix-daemon's socket")
        return self

    def _check_alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"nix-daemon exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
        return True

    def kill(self) -> None:
        """SIGKILL the daemon and everything it started (as ``systemctl kill -s KILL``)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGSTOP)  # no new worker while they are listed
        for pid in [*_descendants(self.process.pid), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.process = None


@contextlib.contextmanager
def running_nix_daemon(conf_dir: Path, log: Path) -> Iterator[NixDaemon]:
    daemon = NixDaemon(conf_dir, log)
    try:
        yield daemon.start()
    finally:
        daemon.kill()


def client_env() -> dict[str, str]:
    """A Nix client that goes through the daemon (as every user but root does on NixOS)."""
    return {**os.environ, "NIX_REMOTE": "daemon"}


def build_via_daemon(workdir: Path, out_link: Path | None = None) -> tuple[str, list[str]]:
    """nix-build (three derivations, unique per call) through nix-daemon: (top, its closure).
    With ``out_link``, Nix registers it as an indirect root (``gcroots/auto/…``)."""
    expr = workdir / "drvs.nix"
    expr.write_text(DERIVATIONS)
    link = ["-o", str(out_link)] if out_link is not None else ["--no-out-link"]
    args = ["nix-build", str(expr), "--argstr", "seed", uuid.uuid4().hex, *link]
    built = subprocess.run(args, capture_output=True, text=True, env=client_env())
    assert built.returncode == 0, built.stderr
    top = built.stdout.strip()
    closure = subprocess.run(["nix-store", "-qR", top], check=True, capture_output=True, text=True, env=client_env())
    return top, closure.stdout.split()


def add_paths_via_daemon(workdir: Path, n: int) -> list[str]:
    """``n`` small, distinct, valid store paths (``nix-store --add`` through the daemon)."""
    files = []
    for i in range(n):
        f = workdir / f"pending-{i}-{uuid.uuid4().hex[:8]}"
        f.write_text(f"{i} {uuid.uuid4()}\n")
        files.append(str(f))
    added = subprocess.run(["nix-store", "--add", *files], capture_output=True, text=True, env=client_env())
    assert added.returncode == 0, added.stderr
    return added.stdout.split()
