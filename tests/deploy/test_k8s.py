"""deploy/k8s: kustomize layout, cross-references, command lines, probes.

The manifests are read as YAML and checked the way a cluster would resolve them: ConfigMaps and
Secrets come from the kustomize generators, ``$(VAR)`` in args from the container's env, volume
mounts from the pod's volumes and claim templates, Service selectors and target ports from the
pods. make-bootstrap-identity.sh runs for real (in a copy of deploy/k8s); the peer's command line
goes through docker/entrypoint.sh (stubbed ``lioncub-peer``) and then the real CLI parser. With
``kubectl`` on PATH, ``kubectl kustomize`` renders the base and the GPU overlay too.
"""

from __future__ import annotations

import ast
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hivemind.utils.multiaddr import Multiaddr

from lioncub.peer.config import load_run_config
from tests.deploy._deploy import (
    DHT_PORT,
    GRPC_PORT,
    K8S,
    METRICS_PORT,
    PathMap,
    check_command,
    dockerfile,
    exec_form,
    lioncub_argv,
    load_yaml,
    load_yaml_all,
    run_entrypoint,
)

BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with its bootstrap identity made by make-bootstrap-identity.sh."""
    dest = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, dest, ignore=shutil.ignore_patterns("bootstrap"))
    proc = subprocess.run(
        [str(dest / "make-bootstrap-identity.sh")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dest


def _objects() -> list[dict[str, Any]]:
    kustomization = load_yaml(BASE / "kustomization.yaml")
    out = []
    for resource in kustomization["resources"]:
        out += load_yaml_all(BASE / resource)
    return out


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in _objects() if o["kind"] == kind}


def _pod_specs() -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    for name, sts in _by_kind("StatefulSet").items():
        yield name, sts["spec"]["template"]["spec"], sts["spec"].get("volumeClaimTemplates", [])


def _generated() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """ConfigMap and Secret names the base's generators make, with their keys."""
    k = load_yaml(BASE / "kustomization.yaml")
    maps: dict[str, set[str]] = {}
    secrets: dict[str, set[str]] = {}
    for gens, out in ((k.get("configMapGenerator", []), maps), (k.get("secretGenerator", []), secrets)):
        for gen in gens:
            keys = {f.split("=")[0] if "=" in f else Path(f).name for f in gen.get("files", [])}
            if gen.get("envs"):
                keys.add("LIONCUB_BOOTSTRAP_PEER_ID")  # what make-bootstrap-identity.sh writes
            out[gen["name"]] = keys
    return maps, secrets


def test_kustomize_layout() -> None:
    top = load_yaml(K8S / "kustomization.yaml")
    assert top["resources"] == ["base"]
    base = load_yaml(BASE / "kustomization.yaml")
    for resource in base["resources"]:
        assert (BASE / resource).is_file(), resource
    for gen in base.get("configMapGenerator", []) + base.get("secretGenerator", []):
        for f in gen.get("files", []) + gen.get("envs", []):
            path = f.split("=")[-1]
            if path.startswith("bootstrap/"):
                assert path in {"bootstrap/bootstrap.id", "bootstrap/bootstrap.env"}
            else:
                assert (BASE / path).is_file(), path
    assert base["namespace"] == "lioncub"
    assert {i["name"] for i in base["images"]} == {"lioncub"}
    gpu = load_yaml(GPU / "kustomization.yaml")
    assert gpu["resources"] == ["../../base"]
    assert gpu["images"] == [{"name": "lioncub", "newTag": "cuda"}]
    (patch,) = gpu["patches"]
    assert patch["target"] == {"kind": "StatefulSet", "name": "lioncub-peer"}
    ops = yaml.safe_load(patch["patch"])
    assert {
        "op": "add",
        "path": "/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu",
        "value": 1,
    } in ops
    assert (
        _by_kind("StatefulSet")["lioncub-peer"]["spec"]["template"]["spec"]["containers"][0]["name"] == "peer"
    )


def test_make_bootstrap_identity(k8s_copy: Path) -> None:
    out = k8s_copy / "base" / "bootstrap"
    assert (out / "bootstrap.id").stat().st_mode & 0o077 == 0, "the private key must be 0600"
    env = dict(line.split("=", 1) for line in (out / "bootstrap.env").read_text().splitlines())
    from lioncub.peer.dht import ensure_identity

    assert env == {"LIONCUB_BOOTSTRAP_PEER_ID": ensure_identity(out / "bootstrap.id")}
    # Running the script again keeps the key: ensure_identity never replaces an existing file.
    assert "base/bootstrap/" in (K8S / ".gitignore").read_text().split()


def test_references_resolve() -> None:
    maps, secrets = _generated()
    services = _by_kind("Service")
    statefulsets = _by_kind("StatefulSet")
    for name, spec, claims in _pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volume_names = set(volumes) | {c["metadata"]["name"] for c in claims}
        for vol in volumes.values():
            if "configMap" in vol:
                cm = vol["configMap"]
                assert cm["name"] in maps, f"{name}: unknown ConfigMap {cm['name']}"
                for item in cm.get("items", []):
                    assert item["key"] in maps[cm["name"]], f"{name}: {cm['name']} has no key {item['key']}"
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets, f"{name}: unknown Secret"
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}/{container['name']}"
            assert container["image"] == "lioncub", f"{where}: the image is set by kustomize `images`"
            mounts = container.get("volumeMounts", [])
            for mount in mounts:
                assert mount["name"] in volume_names, f"{where}: mounts unknown volume {mount['name']}"
            env_names = set()
            for var in container.get("env", []):
                env_names.add(var["name"])
                ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in maps.get(ref["name"], set()), f"{where}: bad configMapKeyRef {ref}"
            for arg in container.get("args", []) + container.get("command", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in env_names, f"{where}: $({var}) is not in the container's env"
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities") == {"drop": ["ALL"]}
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == int(
            next(r for w, r in dockerfile() if w == "USER").split(":")[0]
        )
    for name, sts in statefulsets.items():
        assert sts["spec"]["serviceName"] in services, f"{name}: no Service {sts['spec']['serviceName']}"
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name, svc in services.items():
        pods = [
            s
            for s in statefulsets.values()
            if svc["spec"]["selector"].items() <= s["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"Service {name} selects {len(pods)} StatefulSets"
        ports = {
            p["name"]: p["containerPort"]
            for c in pods[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port {port['targetPort']}"
            assert ports[port["targetPort"]] == port["port"]


def _container(sts: str, name: str) -> dict[str, Any]:
    spec = _by_kind("StatefulSet")[sts]["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def _expand(args: list[str], values: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in args]


def test_peer_command_line(k8s_copy: Path, tmp_path: Path) -> None:
    peer = _container("lioncub-peer", "peer")
    env = {v["name"]: v.get("value", "") for v in peer["env"]}
    bootstrap = dict(
        line.split("=", 1)
        for line in (k8s_copy / "base" / "bootstrap" / "bootstrap.env").read_text().splitlines()
    )
    values = {**env, "POD_IP": "10.244.1.7", **bootstrap}
    # The peer waits for the bootstrap Service: the same name and port as dht.yaml's Service.
    dht_service = _by_kind("Service")["lioncub-dht"]
    assert env["LIONCUB_WAIT_FOR"] == f"lioncub-dht:{dht_service['spec']['ports'][0]['port']}"
    paths = PathMap()
    paths.add("/etc/lioncub", BASE)  # the ConfigMap lioncub-run holds base/run.toml as run.toml
    paths.add("/var/lib/lioncub", tmp_path / "state")
    with socket.socket() as listener:  # stands in for lioncub-dht:31337
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        values["LIONCUB_WAIT_FOR"] = f"127.0.0.1:{listener.getsockname()[1]}"
        argv = [paths(a) for a in _expand(peer["command"] + peer["args"], values)]
        assert argv[0] == "lioncub-entrypoint"
        run = run_entrypoint(argv[1:], {k: values[k] for k in env}, tmp_path / "stubs")
    assert run.returncode == 0, run.stderr
    assert run.argv is not None
    doc = check_command(run.argv)
    p = doc["peer"]
    (maddr,) = ast.literal_eval(p["initial_peers"])  # --check-config prints the tuple's repr
    parsed = Multiaddr(maddr)
    assert parsed.value_for_protocol("dns4") == "lioncub-dht"
    assert int(parsed.value_for_protocol("tcp")) == DHT_PORT
    assert parsed.value_for_protocol("p2p") == bootstrap["LIONCUB_BOOTSTRAP_PEER_ID"]
    assert p["advertise_host"] == "10.244.1.7"
    assert (p["host"], p["port"], p["dht_port"]) == ("0.0.0.0", str(GRPC_PORT), str(DHT_PORT))
    assert (p["metrics_host"], p["metrics_port"]) == ("0.0.0.0", str(METRICS_PORT))
    assert p["resume"] == "True" and p["checkpoint_dir"].startswith(str(tmp_path / "state"))
    assert doc["run"]["run_id"] == load_run_config(BASE / "run.toml").run_id
    annotations = _by_kind("StatefulSet")["lioncub-peer"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert env["LIONCUB_PORT"] == str(GRPC_PORT)


def test_probes_call_lioncub_peer_health() -> None:
    peer = _container("lioncub-peer", "peer")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = peer[probe]["exec"]["command"]
        args = check_command(lioncub_argv(command) or [])
        assert args["command"] == "health" and args["endpoint"] is None  # 127.0.0.1:$LIONCUB_PORT
        assert peer[probe]["timeoutSeconds"] > args["timeout"], f"{probe}: the probe must outlast --timeout"


def test_dht_command_line_and_identity() -> None:
    dht = _container("lioncub-dht", "dht")
    assert "command" not in dht, "the dht container runs the image's ENTRYPOINT"
    entrypoint = exec_form(next(r for w, r in dockerfile() if w == "ENTRYPOINT"))
    args = check_command(lioncub_argv(entrypoint + dht["args"]) or [])
    assert args["command"] == "dht" and args["port"] == DHT_PORT and args["host"] == "0.0.0.0"
    init = _container("lioncub-dht", "identity")
    src, dest = init["command"][-2:]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert Path(src).parent.as_posix() in mounts and Path(src).name == "bootstrap.id"
    assert str(args["identity"]) == dest
    assert mounts[Path(dest).parent.as_posix()] in {m["name"] for m in dht["volumeMounts"]}


def test_run_config_validates() -> None:
    assert load_run_config(BASE / "run.toml").task.name == "shakespeare-char"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", [".", "overlays/gpu"])
def test_kubectl_kustomize_renders(k8s_copy: Path, overlay: str) -> None:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(k8s_copy / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Namespace",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
        "StatefulSet",
    ]
    assert all(o["metadata"].get("namespace") == "lioncub" for o in objects if o["kind"] != "Namespace")
    peer = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "lioncub-peer")
    container = peer["spec"]["template"]["spec"]["containers"][0]
    generated = {o["metadata"]["name"] for o in objects if o["kind"] in ("ConfigMap", "Secret")}
    volumes = peer["spec"]["template"]["spec"]["volumes"]
    assert {v["configMap"]["name"] for v in volumes if "configMap" in v} <= generated
    refs = {
        e["valueFrom"]["configMapKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e and "configMapKeyRef" in e["valueFrom"]
    }
    assert refs <= generated
    if overlay == ".":
        assert (
            container["image"] == "lioncub:cpu" and "nvidia.com/gpu" not in container["resources"]["limits"]
        )
    else:
        assert (
            container["image"] == "lioncub:cuda" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
        )
