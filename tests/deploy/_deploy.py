"""Helpers for the deployment tests: read docker/ and deploy/ files, run their command lines.

Nothing here needs a Docker engine or a cluster. Command lines found in compose files, Kubernetes
manifests, the systemd unit and the Dockerfile go through the real ``lioncub-peer`` parser
(:func:`check_command`; ``join`` with ``--check-config``), after ``docker/entrypoint.sh`` has added
its run-time arguments (:func:`run_entrypoint`, with stub ``lioncub-peer``, ``tc``, ``ip``, ``id``,
``setpriv`` and ``hostname`` programs on ``PATH``). Paths inside containers are mapped to files of
this repository or to temporary directories (:class:`PathMap`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
ENTRYPOINT = DOCKER / "entrypoint.sh"
BUILD_STEPS = REPO / "scripts" / "docker_build_steps.sh"

#: The fixed ports every file agrees on (docker/Dockerfile documents them).
DHT_PORT, GRPC_PORT, METRICS_PORT = 31337, 31338, 9100

#: What the stub ``hostname -I`` prints inside a fake container: the entrypoint must pick the IPv4.
FAKE_CONTAINER_IPS = "127.0.0.1 172.18.0.5 fd00::5"
FAKE_CONTAINER_IP = "172.18.0.5"
#: A bootstrap multiaddr as ``lioncub-peer dht --addr-file`` writes it.
FAKE_BOOTSTRAP = "/ip4/172.18.0.2/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# --------------------------------------------------------------------------------------------------
# Compose


_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$\$")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose-style ``${VAR}`` / ``${VAR:-default}`` / ``$$`` substitution in every string."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            got = env.get(name)
            if got:
                return got
            if default is None:
                raise AssertionError(f"${{{name}}} has no default and is not set")
            return default

        return _COMPOSE_VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    doc = load_yaml(path)
    assert isinstance(doc, dict), f"{path} is not a mapping"
    out = interpolate(doc, env or {})
    assert isinstance(out, dict)
    return out


def as_argv(value: Any) -> list[str]:
    """A compose ``entrypoint`` / ``command`` (list or string) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), value
    return [str(v) for v in value]


def env_dict(value: Any) -> dict[str, str]:
    """A compose ``environment`` (mapping or ``KEY=VALUE`` list) as a dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for item in value:
        key, _, val = str(item).partition("=")
        out[key] = val
    return out


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool
    named: bool


def compose_mounts(service: Mapping[str, Any]) -> list[Mount]:
    mounts = []
    for item in service.get("volumes", []):
        if isinstance(item, dict):
            src, dst, ro = str(item.get("source", "")), str(item["target"]), bool(item.get("read_only"))
        else:
            parts = str(item).split(":")
            src, dst, ro = parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")
        mounts.append(Mount(src, dst, ro, named=not src.startswith((".", "/", "~"))))
    return mounts


# --------------------------------------------------------------------------------------------------
# Paths inside containers


@dataclass
class PathMap:
    """Container path prefixes → host paths (longest prefix wins)."""

    prefixes: dict[str, Path] = field(default_factory=dict)

    def add(self, container: str, host: Path) -> None:
        self.prefixes[container.rstrip("/")] = host

    def __call__(self, value: str) -> str:
        for prefix in sorted(self.prefixes, key=len, reverse=True):
            if value == prefix or value.startswith(prefix + "/"):
                return str(self.prefixes[prefix]) + value[len(prefix) :]
        return value

    def host(self, container: str) -> Path:
        mapped = self(container)
        assert mapped != container, f"{container} is not inside any mounted volume"
        return Path(mapped)


# --------------------------------------------------------------------------------------------------
# The real CLI


@contextlib.contextmanager
def run_settings_env(environ: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with only the ``LIONCUB_SECTION__FIELD`` run settings of ``environ``."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("LIONCUB_") and "__" in k]:
        del os.environ[key]
    os.environ.update({k: v for k, v in environ.items() if k.startswith("LIONCUB_") and "__" in k})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_cli(argv: Sequence[str]) -> Any:
    """``lioncub.peer.cli.build_parser().parse_args(argv)``; a parser error fails with its message."""
    from lioncub.peer.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(list(argv))
    except SystemExit as exc:
        raise AssertionError(f"lioncub-peer rejects {shlex.join(argv)}:\n{err.getvalue()}") from exc


def check_command(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``lioncub-peer ARGV`` as far as it goes without starting anything.

    ``join``: with ``--check-config`` appended, as the real command does (run settings from the
    ``LIONCUB_*__*`` variables of ``environ``); returns the printed document. Other subcommands:
    parsed only; returns the parsed arguments.
    """
    argv = list(argv)
    args = parse_cli(argv)
    if args.command != "join":
        return dict(vars(args))
    from lioncub.peer.cli_join import cmd_join

    args = parse_cli([*argv, "--check-config"])
    out = io.StringIO()
    console = Console(file=out, width=200)
    with run_settings_env(environ or {}), contextlib.redirect_stdout(out):
        rc = cmd_join(args, console)
    assert rc == 0, f"lioncub-peer {shlex.join(argv)} --check-config exited {rc}:\n{out.getvalue()}"
    doc = json.loads(out.getvalue())
    assert isinstance(doc, dict)
    return doc


def lioncub_argv(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``lioncub-peer`` when ``argv`` runs it, else None."""
    if argv and Path(argv[0]).name == "lioncub-peer":
        return list(argv[1:])
    return None


# --------------------------------------------------------------------------------------------------
# docker/entrypoint.sh with stubs

_STUBS = {
    # Records its arguments (NUL-separated); with STUB_HOLD=1 it then keeps running (holding any
    # lock the entrypoint took) until the test kills it.
    "lioncub-peer": """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$STUB_DIR/argv.$$"
mv "$STUB_DIR/argv.$$" "$STUB_DIR/argv"
[ "${STUB_HOLD:-}" != 1 ] || exec sleep 300
""",
    "tc": """#!/usr/bin/env bash
echo "tc $*" >> "$STUB_DIR/net.log"
""",
    "ip": """#!/usr/bin/env bash
echo "ip $*" >> "$STUB_DIR/net.log"
case "$*" in
  "link show ifb0") exit 1 ;;
  "link add ifb0 type ifb") [ "${STUB_IFB:-1}" = 1 ] ;;
esac
""",
    "id": """#!/usr/bin/env bash
if [ "$#" -eq 1 ] && [ "$1" = -u ]; then echo "${STUB_UID:-10001}"; exit 0; fi
if [ "$#" -eq 2 ] && [ "$1" = -u ]; then
  case "$2" in lioncub | nobody) echo 10001; exit 0 ;; esac
  exit 1
fi
exec /usr/bin/id "$@"
""",
    "setpriv": """#!/usr/bin/env bash
echo "setpriv $*" >> "$STUB_DIR/net.log"
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do
  if [ "$1" = -- ]; then shift; break; fi
  shift
done
export STUB_UID=10001
exec "$@"
""",
    "hostname": """#!/usr/bin/env bash
[ "${1:-}" = -I ] && echo "$STUB_IPS" && exit 0
echo fake-container
""",
}


@dataclass
class EntrypointRun:
    returncode: int
    argv: list[str] | None  # what lioncub-peer was started with (None: it was not started)
    net_log: list[str]  # tc / ip / setpriv calls
    stderr: str


def stub_env(stub_dir: Path, env: Mapping[str, str], *, uid: int = 10001) -> dict[str, str]:
    """The environment of an entrypoint run with stubs from ``stub_dir``."""
    bin_dir = stub_dir / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir(parents=True)
        for name, text in _STUBS.items():
            path = bin_dir / name
            path.write_text(text)
            path.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LIONCUB_", "STUB_"))}
    return {
        **base,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "STUB_DIR": str(stub_dir),
        "STUB_UID": str(uid),
        "STUB_IPS": FAKE_CONTAINER_IPS,
        "LIONCUB_WAIT_TIMEOUT": "5",
        **env,
    }


def run_entrypoint(
    argv: Sequence[str], env: Mapping[str, str], stub_dir: Path, *, uid: int = 10001, timeout: float = 60
) -> EntrypointRun:
    """Run ``docker/entrypoint.sh ARGV`` with stubs; ``uid`` is what ``id -u`` reports."""
    full_env = stub_env(stub_dir, env, uid=uid)
    for leftover in ("argv", "net.log"):
        (stub_dir / leftover).unlink(missing_ok=True)
    proc = subprocess.run(
        [str(ENTRYPOINT), *argv], env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )
    argv_file = stub_dir / "argv"
    got = argv_file.read_text().split("\0")[:-1] if argv_file.exists() else None
    log_file = stub_dir / "net.log"
    net = log_file.read_text().splitlines() if log_file.exists() else []
    return EntrypointRun(proc.returncode, got, net, proc.stderr)


# --------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile(path: Path = DOCKER / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            word, _, rest = text.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, f"{path} ends inside a continuation line"
    return out


def exec_form(text: str) -> list[str]:
    """A Dockerfile JSON array (exec form)."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value
