"""docker/Dockerfile, its .dockerignore and the Grafana dashboard, checked without a Docker engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from lioncub.peer.metrics import PeerMetrics
from tests.deploy._deploy import (
    BUILD_STEPS,
    DHT_PORT,
    DOCKER,
    GRPC_PORT,
    METRICS_PORT,
    REPO,
    check_command,
    dockerfile,
    exec_form,
)


def _stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage (``FROM ... AS name`` up to the next FROM)."""
    out: list[tuple[str, str]] = []
    current = None
    for word, rest in dockerfile():
        if word == "FROM":
            current = rest.split()[-1]
        elif current == name:
            out.append((word, rest))
    assert out, f"no stage {name!r}"
    return out


def _one(word: str) -> str:
    found = [rest for w, rest in dockerfile() if w == word]
    assert len(found) == 1, f"expected one {word} in docker/Dockerfile, found {len(found)}"
    return found[0]


def test_stages_base_image_and_variant() -> None:
    steps = dockerfile()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    args = [rest for word, rest in steps if word == "ARG"]
    assert "PYTHON_IMAGE=python:3.11-slim-bookworm" in args
    assert "VARIANT=cpu" in args and "TORCH_SPEC=torch==2.13.0" in args
    # The torch spec is the one ./dev pins.
    assert 'TORCH_SPEC="${LIONCUB_TORCH_SPEC:-torch==2.13.0}"' in (REPO / "dev").read_text()


def test_runs_as_a_numeric_non_root_user() -> None:
    user = _one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), f"USER {user}: use a numeric non-root uid:gid"
    run = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    assert f"--uid {uid}" in run and f"--gid {gid}" in run


def test_entrypoint_cmd_and_ports() -> None:
    assert exec_form(_one("ENTRYPOINT")) == ["lioncub-peer"]
    cmd = exec_form(_one("CMD"))
    doc = check_command(cmd)
    peer = doc["peer"]
    assert (peer["host"], peer["port"]) == ("0.0.0.0", str(GRPC_PORT))
    assert (peer["dht_host"], peer["dht_port"]) == ("0.0.0.0", str(DHT_PORT))
    assert (peer["metrics_host"], peer["metrics_port"]) == ("0.0.0.0", str(METRICS_PORT))
    exposed = {int(p.split("/")[0]) for p in _one("EXPOSE").split()}
    assert exposed == {DHT_PORT, GRPC_PORT, METRICS_PORT}
    runtime_env = " ".join(rest for w, rest in _stage("runtime") if w == "ENV")
    # `lioncub-peer health` (HEALTHCHECK, probes) dials 127.0.0.1:$LIONCUB_PORT.
    assert f"LIONCUB_PORT={GRPC_PORT}" in runtime_env
    assert "PATH=/opt/lioncub/bin:$PATH" in runtime_env


def test_healthcheck_is_lioncub_peer_health() -> None:
    text = _one("HEALTHCHECK")
    options, sep, command = text.partition(" CMD ")
    assert sep, "HEALTHCHECK needs CMD"
    argv = exec_form(command)
    assert argv[0] == "lioncub-peer"
    args = check_command(argv[1:])
    assert args["command"] == "health" and args["endpoint"] is None  # 127.0.0.1:$LIONCUB_PORT
    timeout = dict(re.findall(r"--([a-z-]+)=(\S+)", options))["timeout"]
    assert float(timeout.rstrip("s")) > args["timeout"], "the check's own timeout must be shorter"


def test_corpus_is_baked_in_where_the_runtime_looks() -> None:
    envs = " ".join(rest for w, rest in dockerfile() if w == "ENV")
    cache_dirs = set(re.findall(r"LIONCUB_CACHE_DIR=(\S+)", envs))
    assert len(cache_dirs) == 1, f"build and runtime must agree on LIONCUB_CACHE_DIR: {cache_dirs}"
    (cache_dir,) = cache_dirs
    copies = [rest for w, rest in dockerfile() if w == "COPY"]
    assert f"--from=build {cache_dir} {cache_dir}" in copies
    runs = " ".join(rest for w, rest in dockerfile() if w == "RUN")
    assert "docker_build_steps.sh corpus" in runs


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """docker/Dockerfile.dockerignore as (negated, regex) pairs, in Docker's pattern syntax."""
    out = []
    for raw in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(regex)))
    return out


def _sent(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            included = negate
    return included


def test_every_copy_source_exists_and_reaches_the_build() -> None:
    patterns = _ignore_patterns()
    sources = []
    for word, rest in dockerfile():
        if word != "COPY" or rest.startswith("--from="):
            continue
        *srcs, _dest = rest.split()
        sources += srcs
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert _sent(src, patterns), f"COPY {src}: excluded by docker/Dockerfile.dockerignore"
        if (REPO / src).is_dir():
            for child in (REPO / src).rglob("*.py"):
                rel = child.relative_to(REPO).as_posix()
                assert _sent(rel, patterns), f"{rel} is excluded by docker/Dockerfile.dockerignore"
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "swarm-out/summary.json"):
        assert not _sent(unwanted, patterns), f"{unwanted} would be sent to the Docker daemon"


def test_build_steps_used_by_the_dockerfile_exist() -> None:
    script = BUILD_STEPS.read_text()
    defined = set(re.findall(r"^  ([a-z]+)\) step_", script, flags=re.M))
    used = set()
    for word, rest in dockerfile():
        if word == "RUN":
            used |= set(re.findall(r"docker_build_steps\.sh ([a-z]+)", rest))
    assert used == defined == {"venv", "torch", "deps", "lioncub", "corpus", "check"}


def _metric_names() -> set[str]:
    metrics = PeerMetrics("peer", "run")
    metrics.record_failure("timeout")
    text = generate_latest(metrics.registry).decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def test_dashboard_queries_use_real_metrics() -> None:
    dashboard = json.loads((DOCKER / "monitoring" / "grafana" / "dashboards" / "lioncub.json").read_text())
    names = _metric_names()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        found = set(re.findall(r"\blioncub_[a-z_]+", expr))
        assert found, f"query uses no lioncub metric: {expr}"
        assert found <= names, f"unknown metrics {found - names} in {expr}"
        used |= found
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "lioncub-prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {"lioncub_loss", "lioncub_round", "lioncub_bytes_sent_total"} <= used


def test_shell_scripts_are_strict_and_executable() -> None:
    for path in (
        DOCKER / "entrypoint.sh",
        BUILD_STEPS,
        REPO / "deploy" / "k8s" / "make-bootstrap-identity.sh",
    ):
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), path
        assert "\nset -euo pipefail\n" in text, f"{path}: needs set -euo pipefail"
        assert Path(path).stat().st_mode & 0o111, f"{path} is not executable"
