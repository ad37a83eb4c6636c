"""``lioncub-peer health``: ask a peer's gRPC ``Health`` RPC whether it is alive (for probes).

Exit status: 0 when the peer answers ``alive``; 1 when nothing answers within ``--timeout`` or the
peer answers ``alive = false``; 2 when ``--endpoint`` (or ``$LIONCUB_PORT``) is malformed.

The default endpoint is ``127.0.0.1:$LIONCUB_PORT``, or ``127.0.0.1:31338`` when the variable is
unset: the gRPC port the container images and manifests give every peer (``join --host 0.0.0.0
--port 31338``), so a Docker ``HEALTHCHECK`` or a Kubernetes exec probe needs no arguments. A peer
started with ``--port 0`` (the ``join`` default) binds a free port: pass ``--endpoint`` with the
``endpoint`` of its ``started`` event. Client-mode peers serve no gRPC, so they have no health check.

The check speaks plaintext gRPC (peers started by ``lioncub-peer join`` serve without TLS).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from rich.console import Console

from lioncub.protocol import grpc_message_options
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_PORT",
    "PORT_ENV",
    "EndpointError",
    "HealthStatus",
    "PeerUnreachable",
    "add_health_parser",
    "check_health",
    "cmd_health",
    "default_endpoint",
    "main",
    "parse_endpoint",
]

#: The gRPC port of peers in the container images, the Kubernetes manifests and the systemd unit.
DEFAULT_PORT = 31338
#: Environment variable that overrides the port of the default endpoint.
PORT_ENV = "LIONCUB_PORT"
_MAX_TIMEOUT = 3600.0


class EndpointError(ValueError):
    """An endpoint is not ``HOST:PORT`` with a port in 1..65535."""


class PeerUnreachable(Exception):
    """No Health answer came back (connection refused, timeout, not a lioncub peer, ...)."""


@dataclass(frozen=True)
class HealthStatus:
    """What a peer's Health RPC answered."""

    endpoint: str
    alive: bool
    peer_id: str
    run_id: str
    round: int
    software_version: str
    protocol_version: int


def _port(text: str, where: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise EndpointError(f"{where}: the port must be an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise EndpointError(f"{where}: the port must be in 1..65535, got {port}")
    return port


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> str:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` → the ``host:port`` target gRPC dials."""
    text = text.strip()
    port = default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise EndpointError(f"endpoint {text!r}: expected [IPv6 address]:PORT")
        if rest:
            port = _port(rest[1:], f"endpoint {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise EndpointError(f"endpoint {text!r}: {host!r} is not an IPv6 address") from None
        return f"[{host}]:{port}"
    if text.count(":") > 1:
        raise EndpointError(f"endpoint {text!r}: write IPv6 addresses in brackets, e.g. [::1]:{port}")
    host, sep, port_text = text.partition(":")
    if sep:
        port = _port(port_text, f"endpoint {text!r}")
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise EndpointError(f"endpoint {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return f"{host}:{port}"


def default_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """``127.0.0.1:$LIONCUB_PORT``, or ``127.0.0.1:31338`` when it is unset or empty."""
    env = os.environ if environ is None else environ
    text = env.get(PORT_ENV, "").strip()
    port = _port(text, f"${PORT_ENV}") if text else DEFAULT_PORT
    return f"127.0.0.1:{port}"


def check_health(endpoint: str, timeout: float = 5.0) -> HealthStatus:
    """Call ``Health`` on ``endpoint`` (``host:port``) and return the answer.

    Raises:
        EndpointError: ``endpoint`` is malformed.
        PeerUnreachable: no answer within ``timeout`` seconds, or the call failed.
    """
    target = parse_endpoint(endpoint)
    if not 0 < timeout <= _MAX_TIMEOUT:
        raise ValueError(f"timeout must be in (0, {_MAX_TIMEOUT:.0f}] seconds, got {timeout}")
    with grpc.insecure_channel(target, options=grpc_message_options()) as channel:
        stub = pb_grpc.LioncubPeerStub(channel)
        try:
            reply = stub.Health(pb.HealthRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else type(exc).__name__
            raise PeerUnreachable(
                f"no lioncub peer answered at {target} within {timeout:g} s ({name}: {details})"
            ) from None
    return HealthStatus(
        endpoint=target,
        alive=bool(reply.alive),
        peer_id=reply.peer_id,
        run_id=reply.run_id,
        round=int(reply.round),
        software_version=reply.software_version,
        protocol_version=int(reply.protocol_version),
    )


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= _MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, {_MAX_TIMEOUT:.0f}], got {text}")
    return value


def add_health_parser(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="ask a peer's gRPC Health RPC whether it is alive (exit 0) or not (exit 1)",
        description=(
            f"Exit 0 when the peer answers alive, 1 when it is unreachable or not alive. "
            f"Default endpoint: 127.0.0.1:${PORT_ENV}, or 127.0.0.1:{DEFAULT_PORT} when unset."
        ),
    )
    p.add_argument(
        "--endpoint",
        default=None,
        metavar="HOST:PORT",
        help=f"the peer's gRPC endpoint (default 127.0.0.1:${PORT_ENV}, else 127.0.0.1:{DEFAULT_PORT})",
    )
    p.add_argument("--timeout", type=_timeout, default=5.0, help="seconds to wait for the answer (default 5)")
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object")


def cmd_health(args: argparse.Namespace, console: Console) -> int:
    try:
        endpoint = parse_endpoint(args.endpoint) if args.endpoint is not None else default_endpoint()
    except EndpointError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    try:
        status = check_health(endpoint, args.timeout)
    except PeerUnreachable as exc:
        if args.json:
            print(json.dumps({"endpoint": endpoint, "alive": False, "error": str(exc)}))
        else:
            console.print(f"unreachable: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    if args.json:
        print(json.dumps(asdict(status)))
    else:
        state = "alive" if status.alive else "NOT alive"
        console.print(
            f"{state}: peer {status.peer_id} run {status.run_id or '-'} round {status.round} "
            f"at {status.endpoint} (lioncub {status.software_version}, protocol {status.protocol_version})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return 0 if status.alive else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lioncub.peer.cli_health [--endpoint HOST:PORT] [--timeout S] [--json]``."""
    parser = argparse.ArgumentParser(prog="lioncub-peer")
    add_health_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["health", *(sys.argv[1:] if argv is None else argv)])
    return cmd_health(args, Console())


if __name__ == "__main__":
    sys.exit(main())
