"""docker/compose.yml and docker/compose.volunteer.yml: structure, cross-references, command lines.

Every service that runs ``lioncub-peer`` is started the way Docker would start it: its entrypoint
(docker/entrypoint.sh) runs with the service's environment and user, volumes become temporary
directories (bind mounts the repository's files), a fake bootstrap node has written its address,
and the command the entrypoint finally execs goes through the real CLI parser (``join`` with
``--check-config``, so docker/run.toml and any ``LIONCUB_*`` run settings are validated too).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from lioncub.peer.config import load_run_config, to_dict
from tests.deploy._deploy import (
    DHT_PORT,
    DOCKER,
    FAKE_BOOTSTRAP,
    FAKE_CONTAINER_IP,
    GRPC_PORT,
    METRICS_PORT,
    REPO,
    PathMap,
    as_argv,
    check_command,
    compose,
    compose_mounts,
    dockerfile,
    env_dict,
    exec_form,
    interpolate,
    lioncub_argv,
    load_yaml,
    run_entrypoint,
)

COMPOSE_FILES = ["compose.yml", "compose.volunteer.yml"]
PROFILES = {"uniform-100", "uniform-20", "volunteer"}


def _image_entrypoint() -> list[str]:
    return exec_form(next(rest for word, rest in dockerfile() if word == "ENTRYPOINT"))


def _image_cmd() -> list[str]:
    return exec_form(next(rest for word, rest in dockerfile() if word == "CMD"))


def lioncub_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in doc["services"].items()
        if "lioncub" in str(svc.get("image", "")) or "build" in svc
    }


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_parses_and_cross_references(name: str) -> None:
    path = DOCKER / name
    doc = compose(path)
    services = doc["services"]
    declared = set(doc.get("volumes") or {})
    used: set[str] = set()
    for svc_name, svc in services.items():
        assert "image" in svc, f"{svc_name}: no image"
        for mount in compose_mounts(svc):
            if mount.named:
                assert mount.source in declared, f"{svc_name}: volume {mount.source!r} is not declared"
                used.add(mount.source)
            else:
                assert (path.parent / mount.source).exists(), f"{svc_name}: {mount.source} does not exist"
        for dep, cond in (
            (svc.get("depends_on") or {}).items()
            if isinstance(svc.get("depends_on"), dict)
            else ((d, None) for d in svc.get("depends_on") or [])
        ):
            assert dep in services, f"{svc_name} depends on unknown service {dep!r}"
            if cond and cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{svc_name} waits for {dep} to be healthy; it has no check"
                )
        if "build" in svc:
            build = svc["build"]
            context = (path.parent / build["context"]).resolve()
            assert context == REPO, f"{svc_name}: the build context must be the repository root"
            assert (context / build["dockerfile"]).is_file()
        for port in svc.get("ports", []):
            assert svc_name in {"prometheus", "grafana"}, f"{svc_name}: peers must not publish host ports"
            assert str(port).startswith("127.0.0.1:"), f"{svc_name}: publish on localhost only, got {port}"
    assert used == declared, f"declared but unused volumes: {declared - used}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_variables_have_defaults(name: str) -> None:
    interpolate(load_yaml(DOCKER / name), {})  # raises on a ${VAR} without a default


def _run_service(
    path: Path, svc_name: str, svc: dict[str, Any], tmp: Path, *, bootstrap: bool = True
) -> tuple[list[str], dict[str, str], PathMap]:
    """Start ``svc`` the way Docker would, up to the lioncub-peer command; return its arguments."""
    paths = PathMap()
    for mount in compose_mounts(svc):
        host = (path.parent / mount.source) if not mount.named else tmp / "volumes" / mount.source
        if mount.named:
            host.mkdir(parents=True, exist_ok=True)
        paths.add(mount.target, host)
    env = {k: paths(v) for k, v in env_dict(svc.get("environment")).items()}
    if bootstrap and "LIONCUB_BOOTSTRAP_ADDR_FILE" in env:
        Path(env["LIONCUB_BOOTSTRAP_ADDR_FILE"]).write_text(FAKE_BOOTSTRAP + "\n")
    entrypoint = as_argv(svc.get("entrypoint")) or _image_entrypoint()
    command = as_argv(svc.get("command")) if "command" in svc else _image_cmd()
    argv = [paths(a) for a in [*entrypoint, *command]]
    uid = 0 if str(svc.get("user", "")) in ("root", "0") else 10001
    if entrypoint == ["lioncub-entrypoint"]:
        run = run_entrypoint(argv[1:], env, tmp / f"stubs-{svc_name}", uid=uid)
        assert run.returncode == 0, f"{svc_name}: the entrypoint failed:\n{run.stderr}"
        assert run.argv is not None, f"{svc_name}: lioncub-peer was not started"
        return run.argv, env, paths
    got = lioncub_argv(argv)
    assert got is not None, f"{svc_name}: does not run lioncub-peer: {argv}"
    return got, env, paths


def _peer_services(name: str) -> list[tuple[str, dict[str, Any]]]:
    doc = compose(DOCKER / name)
    return [(n, s) for n, s in lioncub_services(doc).items() if "join" in as_argv(s.get("command"))]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_peer_command_lines_are_accepted(name: str, tmp_path: Path) -> None:
    path = DOCKER / name
    peers = _peer_services(name)
    assert peers, f"{name} has no peer service"
    expected_run = to_dict(load_run_config(DOCKER / "run.toml"))
    for svc_name, svc in peers:
        argv, env, paths = _run_service(path, svc_name, svc, tmp_path / svc_name)
        doc = check_command(argv, env)
        peer = doc["peer"]
        assert doc["run"] == expected_run, f"{svc_name}: not the run of docker/run.toml"
        assert peer["host"] == "0.0.0.0" and peer["port"] == str(GRPC_PORT)
        assert peer["dht_host"] == "0.0.0.0" and peer["dht_port"] == str(DHT_PORT)
        assert peer["initial_peers"] == str((FAKE_BOOTSTRAP,))
        assert peer["advertise_host"] == FAKE_CONTAINER_IP
        assert peer["resume"] == "True"
        slots = paths.host(svc["environment"]["LIONCUB_SLOTS_DIR"])
        assert peer["checkpoint_dir"] == str(slots / "slot-0" / "checkpoints")
        assert peer["identity_path"] == str(slots / "slot-0" / "peer.key")
        shaped = svc["environment"].get("LIONCUB_SHAPE_UP_MBIT")
        if shaped:
            assert float(peer["bandwidth_mbps"]) == float(shaped)
            assert "NET_ADMIN" in svc.get("cap_add", []) and svc.get("user") == "root"
        assert svc.get("init") is True, f"{svc_name}: needs an init to reap the DHT's helper processes"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_dht_service(name: str, tmp_path: Path) -> None:
    path = DOCKER / name
    doc = compose(path)
    svc = doc["services"]["dht"]
    argv, _, paths = _run_service(path, "dht", svc, tmp_path, bootstrap=False)
    args = check_command(argv)
    assert args["command"] == "dht"
    assert args["port"] == DHT_PORT and args["host"] == "0.0.0.0"
    # Its identity lives in a volume of its own (stable peer id); its address goes where peers read it.
    identity_mount = next(
        m for m in compose_mounts(svc) if str(args["identity"]).startswith(str(paths(m.target)))
    )
    assert identity_mount.named and identity_mount.source not in {
        m.source for _, s in _peer_services(name) for m in compose_mounts(s)
    }, "the bootstrap node's private key must not be mounted into peers"
    addr_file = Path(args["addr_file"])
    for svc_name, peer in _peer_services(name):
        peer_env = env_dict(peer.get("environment"))
        peer_paths = PathMap()
        for m in compose_mounts(peer):
            peer_paths.add(m.target, tmp_path / "volumes" / m.source)
        assert peer_paths(peer_env["LIONCUB_BOOTSTRAP_ADDR_FILE"]) == str(addr_file), (
            f"{svc_name} reads the bootstrap address from another place than dht writes it"
        )
    healthcheck = as_argv(svc["healthcheck"]["test"])
    assert (
        healthcheck[-1]
        == next(m.target for m in compose_mounts(svc) if m.source == "swarm") + "/" + addr_file.name
    )


#: The link profiles the issue asks for (down, up Mbit/s per peer); bench/profiles.py has the same.
LINKS = {
    "uniform-100": [(100.0, 100.0)] * 4,
    "uniform-20": [(20.0, 20.0)] * 4,
    "volunteer": [(200.0, 50.0), (50.0, 10.0), (50.0, 10.0), (20.0, 5.0)],
}


def _compose_links() -> dict[str, list[tuple[float, float]]]:
    doc = compose(DOCKER / "compose.volunteer.yml")
    links: dict[str, list[tuple[float, float]]] = {}
    for _, svc in doc["services"].items():
        profiles = svc.get("profiles") or []
        if not profiles:
            continue
        assert len(profiles) == 1 and profiles[0] in PROFILES
        env = svc["environment"]
        replicas = int((svc.get("deploy") or {}).get("replicas", 1))
        link = (float(env["LIONCUB_SHAPE_DOWN_MBIT"]), float(env["LIONCUB_SHAPE_UP_MBIT"]))
        links.setdefault(profiles[0], []).extend([link] * replicas)
    return links


def test_volunteer_profiles() -> None:
    links = _compose_links()
    assert set(links) == PROFILES == set(LINKS)
    for name, got in links.items():
        assert sorted(got) == sorted(LINKS[name]), f"profile {name}: {got}"


def test_volunteer_profiles_match_the_bench_profiles() -> None:
    """The same links as bench/profiles.py, which shapes veths in network namespaces."""
    path = REPO / "bench" / "profiles.py"
    if not path.exists():
        pytest.skip("bench/profiles.py is not in this checkout (test_volunteer_profiles still applies)")
    spec = importlib.util.spec_from_file_location("_bench_profiles", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    for name, got in _compose_links().items():
        # bench/profiles.py: peer i gets links[i % len(links)]; compose runs 4 peers per profile.
        bench = module.get_profile(name).links
        want = [(bench[i % len(bench)].down_mbit, bench[i % len(bench)].up_mbit) for i in range(4)]
        assert sorted(got) == sorted(want), f"profile {name}: compose has {got}, bench has {want}"


def test_monitoring_scrapes_every_peer() -> None:
    doc = compose(DOCKER / "compose.yml")
    services = doc["services"]
    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["monitoring"]
    prom_mount = next(
        m for m in compose_mounts(services["prometheus"]) if m.target.endswith("prometheus.yml")
    )
    prom = load_yaml(DOCKER / prom_mount.source)
    (job,) = prom["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    peer_cmd = as_argv(services["peer"]["command"])
    metrics_port = int(peer_cmd[peer_cmd.index("--metrics-port") + 1])
    assert metrics_port == METRICS_PORT == sd["port"]
    assert peer_cmd[peer_cmd.index("--metrics-host") + 1] == "0.0.0.0", "metrics must be reachable"
    assert sd["names"] == ["peer"] and sd["type"] == "A"
    assert str(METRICS_PORT) in [str(p) for p in services["peer"]["expose"]]
    # Grafana: the data source is the prometheus service; dashboards come from the mounted folder.
    gmounts = {m.target: DOCKER / m.source for m in compose_mounts(services["grafana"]) if not m.named}
    provisioning = gmounts["/etc/grafana/provisioning"]
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert re.fullmatch(r"http://prometheus:9090/?", source["url"])
    (provider,) = load_yaml(provisioning / "dashboards" / "lioncub.yml")["providers"]
    dashboards = gmounts[provider["options"]["path"]]
    assert (dashboards / "lioncub.json").is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/lioncub.json"
