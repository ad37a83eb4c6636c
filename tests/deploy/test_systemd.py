"""deploy/systemd: the volunteer's unit and its environment file.

ExecStart is expanded the way systemd does it (``%S``/``%C`` specifiers, ``${VAR}`` as one argument,
a lone ``$VAR`` split at whitespace, values from the EnvironmentFile) and goes through the real
CLI parser with ``--check-config``. With systemd-analyze on PATH, ``systemd-analyze verify`` checks
every directive name and value too.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy._deploy import DEPLOY, DHT_PORT, GRPC_PORT, check_command

UNIT = DEPLOY / "systemd" / "lioncub-peer.service"
ENV_FILE = DEPLOY / "systemd" / "lioncub-peer.env"
SPECIFIERS = {"%S": "/var/lib", "%C": "/var/cache", "%%": "%"}


def unit_entries(path: Path = UNIT) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def service(key: str) -> list[str]:
    return [v for k, v in unit_entries()["Service"] if k == key]


def env_file(text: str) -> dict[str, str]:
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def expand_exec(line: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion, for the forms the unit uses."""

    def specifiers(text: str) -> str:
        return re.sub(r"%[SC%]", lambda m: SPECIFIERS[m.group(0)], text)

    argv: list[str] = []
    for word in shlex.split(line):
        lone = re.fullmatch(r"\$(\w+)", word)
        if lone:
            argv += env.get(lone.group(1), "").split()
        else:
            argv.append(specifiers(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)))
    return argv


def _exec_start(env: dict[str, str]) -> list[str]:
    (line,) = service("ExecStart")
    unit_env = dict(v.split("=", 1) for v in service("Environment"))
    argv = expand_exec(line, {**unit_env, **env})
    assert argv[0] == "/opt/lioncub/bin/lioncub-peer", "the install instructions put lioncub in /opt/lioncub"
    return argv[1:]


def test_exec_start_with_the_shipped_env_file() -> None:
    env = env_file(ENV_FILE.read_text())
    doc = check_command(_exec_start(env), env)
    peer = doc["peer"]
    assert peer["client_mode"] == "True", "the default suits a volunteer behind NAT"
    assert peer["initial_peers"] == str((env["LIONCUB_DHT"],))
    assert peer["checkpoint_dir"] == "/var/lib/lioncub/checkpoints" and peer["resume"] == "True"
    assert peer["identity_path"] == "/var/lib/lioncub/peer.key"
    assert doc["run"] is None, "a volunteer takes the run from the DHT"


def test_exec_start_for_a_reachable_volunteer() -> None:
    """The commented-out LIONCUB_JOIN_ARGS for a machine with open ports works too."""
    text = ENV_FILE.read_text()
    alternative = re.search(r"^# (LIONCUB_JOIN_ARGS=--host .*)$", text, flags=re.M)
    assert alternative, "the env file shows the reachable-peer flags"
    env = {**env_file(text), **env_file(alternative.group(1))}
    peer = check_command(_exec_start(env), env)["peer"]
    assert peer["client_mode"] == "False"
    assert (peer["host"], peer["port"], peer["dht_port"]) == ("0.0.0.0", str(GRPC_PORT), str(DHT_PORT))
    assert re.search(rf"\b{GRPC_PORT}\b.*\b{DHT_PORT}\b|\b{DHT_PORT}\b.*\b{GRPC_PORT}\b", text)


def test_restart_state_user_and_hardening() -> None:
    want = {
        "Restart": "on-failure",
        "DynamicUser": "yes",
        "StateDirectory": "lioncub",
        "CacheDirectory": "lioncub",
        "KillMode": "mixed",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "EnvironmentFile": "/etc/lioncub/lioncub-peer.env",
    }
    got = {k: service(k) for k in want}
    assert got == {k: [v] for k, v in want.items()}
    assert "LIONCUB_CACHE_DIR=%C/lioncub" in service("Environment")
    # Checkpoints and the key live in the StateDirectory (%S/lioncub), which survives restarts.
    (line,) = service("ExecStart")
    assert "--checkpoint-dir %S/lioncub/" in line and "--resume" in line and "--identity %S/lioncub/" in line
    install = dict(unit_entries()["Install"])
    assert install == {"WantedBy": "multi-user.target"}
    assert (
        "install -D -m 0644 deploy/systemd/lioncub-peer.env /etc/lioncub/lioncub-peer.env" in UNIT.read_text()
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants ExecStart's program to exist: point it at this environment's lioncub-peer.
    program = Path(sys.executable).parent / "lioncub-peer"
    assert program.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/lioncub/bin/lioncub-peer", str(program)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
