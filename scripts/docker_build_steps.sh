#!/usr/bin/env bash
# The shell steps of docker/Dockerfile, in one place: the image build runs them, and
# tests/deploy/test_build_steps.py runs the same steps in a temporary venv (see there for what a
# test can and cannot cover without Docker).
#
# usage: scripts/docker_build_steps.sh STEP [SRC]
#   venv          create the virtual environment $LIONCUB_VENV with ${PYTHON:-python3}
#   torch         install $LIONCUB_TORCH_SPEC for $LIONCUB_VARIANT (cpu: the PyTorch CPU index)
#   deps SRC      install the runtime dependencies listed in SRC/pyproject.toml (a cached layer)
#   lioncub SRC   install lioncub itself from the source tree SRC (no dependencies, no dev extras)
#   corpus        fetch the Shakespeare corpus into $LIONCUB_CACHE_DIR, readable by every user
#   check         run `lioncub-peer --help` (imports everything), print what was installed
#
# Environment:
#   LIONCUB_VENV             the venv (default /opt/lioncub)
#   LIONCUB_VARIANT          cpu (default) or cuda
#   LIONCUB_TORCH_SPEC       default torch==2.13.0, the version ./dev pins
#   LIONCUB_TORCH_INDEX_URL  auto (default): https://download.pytorch.org/whl/cpu for cpu, PyPI for
#                            cuda (PyPI's Linux x86_64 torch wheels bundle the CUDA runtime);
#                            pypi: PyPI; anything else: that index URL
#   LIONCUB_CACHE_DIR        where `corpus` puts the corpus (required by that step)
set -euo pipefail

VENV="${LIONCUB_VENV:-/opt/lioncub}"
VARIANT="${LIONCUB_VARIANT:-cpu}"
TORCH_SPEC="${LIONCUB_TORCH_SPEC:-torch==2.13.0}"
PIP_FLAGS=(--no-cache-dir --disable-pip-version-check --no-input)

die() {
  echo "docker_build_steps: $*" >&2
  exit 1
}

venv_python() {
  [ -x "$VENV/bin/python" ] || die "no venv at $VENV; run the 'venv' step first"
  echo "$VENV/bin/python"
}

need_src() {
  [ -n "${1:-}" ] || die "this step needs the source tree: $0 STEP SRC"
  [ -f "$1/pyproject.toml" ] || die "$1/pyproject.toml not found"
}

step_venv() {
  "${PYTHON:-python3}" -m venv "$VENV"
}

step_torch() {
  local py index
  py="$(venv_python)"
  case "$VARIANT" in
    cpu | cuda) ;;
    *) die "LIONCUB_VARIANT must be cpu or cuda, got '$VARIANT'" ;;
  esac
  index="${LIONCUB_TORCH_INDEX_URL:-auto}"
  if [ "$index" = auto ]; then
    index=pypi
    [ "$VARIANT" = cuda ] || index=https://download.pytorch.org/whl/cpu
  fi
  [ "$index" != pypi ] || index=""
  if [ -n "$index" ]; then
    "$py" -m pip install "${PIP_FLAGS[@]}" --index-url "$index" "$TORCH_SPEC"
  else
    "$py" -m pip install "${PIP_FLAGS[@]}" "$TORCH_SPEC"
  fi
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

step_deps() {
  need_src "${1:-}"
  local py
  py="$(venv_python)"
  local -a deps
  # pyproject.toml's [project] dependencies, one per line (tomllib: Python >= 3.11).
  mapfile -t deps < <("$py" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
' "$1/pyproject.toml")
  [ "${#deps[@]}" -gt 0 ] || die "no dependencies found in $1/pyproject.toml"
  "$py" -m pip install "${PIP_FLAGS[@]}" "${deps[@]}"
}

step_lioncub() {
  need_src "${1:-}"
  # An absolute path, so that pip never takes a bare directory name for a package name.
  "$(venv_python)" -m pip install "${PIP_FLAGS[@]}" --no-deps "$(cd "$1" && pwd)"
}

step_corpus() {
  [ -n "${LIONCUB_CACHE_DIR:-}" ] || die "set LIONCUB_CACHE_DIR to where the corpus should go"
  mkdir -p "$LIONCUB_CACHE_DIR"
  "$VENV/bin/lioncub-peer" fetch-data --cache-dir "$LIONCUB_CACHE_DIR"
  # The corpus is written 0600 by whoever fetched it (root in the image); the peers run as another
  # user and only read it.
  chmod -R a+rX "$LIONCUB_CACHE_DIR"
}

step_check() {
  # The console script imports the whole CLI (torch, hivemind, gRPC) before printing its help.
  "$VENV/bin/lioncub-peer" --help >/dev/null
  "$(venv_python)" -m pip show lioncub torch | grep -E '^(Name|Version|Location):'
}

step="${1:-}"
[ $# -gt 0 ] && shift
case "$step" in
  venv) step_venv ;;
  torch) step_torch ;;
  deps) step_deps "$@" ;;
  lioncub) step_lioncub "$@" ;;
  corpus) step_corpus ;;
  check) step_check ;;
  *)
    echo "usage: $0 {venv|torch|deps SRC|lioncub SRC|corpus|check}" >&2
    exit 2
    ;;
esac
