#!/usr/bin/env bash
# Create the bootstrap DHT node's identity for deploy/k8s, once:
#   base/bootstrap/bootstrap.id   its libp2p private key  -> the Secret lioncub-dht-identity
#   base/bootstrap/bootstrap.env  its peer id             -> the ConfigMap lioncub-bootstrap, from
#                                 which the peers build the bootstrap multiaddr
# Run again, it keeps the existing key and rewrites bootstrap.env. Keep bootstrap.id secret and keep
# it: a new key is a new peer id, so every peer would need re-applying. (It is git-ignored.)
#
# usage: deploy/k8s/make-bootstrap-identity.sh
# Needs Python with lioncub installed ($PYTHON, else the repository's .venv, else python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
default_python=python3
[ ! -x "$here/../../.venv/bin/python" ] || default_python="$here/../../.venv/bin/python"
PYTHON="${PYTHON:-$default_python}"

out="$here/base/bootstrap"
mkdir -p "$out"
chmod 700 "$out"
peer_id="$("$PYTHON" -c '
import sys
from lioncub.peer.dht import ensure_identity
print(ensure_identity(sys.argv[1]))
' "$out/bootstrap.id")"
[ -n "$peer_id" ] || {
  echo "make-bootstrap-identity: no peer id" >&2
  exit 1
}
printf 'LIONCUB_BOOTSTRAP_PEER_ID=%s\n' "$peer_id" >"$out/bootstrap.env"
echo "bootstrap peer id: $peer_id"
echo "peers dial /dns4/lioncub-dht/tcp/31337/p2p/$peer_id"
