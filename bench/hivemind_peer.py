"""The external anchor of the swarm bench: one peer training a lioncub task with ``hivemind.Optimizer``.

    python bench/hivemind_peer.py --dht MADDR --host 10.213.0.3 --task shakespeare-char \\
        --peers 4 --data-shard 0 --num-data-shards 4 --progress jsonl

Same task, model, seed, data shard and batch size as ``lioncub-peer join``; the local optimizer is
lioncub's Lion (lr ``--lr``), wrapped in ``hivemind.Optimizer`` with its stock settings
(synchronous data-parallel training: accumulate ``--target-batch-size`` samples across the swarm,
average the gradients, step; ``matchmaking_time=15``, ``averaging_timeout=60``, state averaged
every epoch) and fp16 compression for gradients and state (hivemind's 8-bit codecs fail under
numpy >= 2.4, DESIGN.md section 6). Reports the same JSONL events as ``lioncub-peer join
--progress jsonl`` (``started``, one ``round`` per local step, ``finished``), except that
``bytes_sent``/``bytes_received`` are this namespace's *wire* bytes (``/sys/class/net``, all
traffic: hivemind exposes no payload counter) and ``round`` is hivemind's ``local_epoch``.

Stops after ``--max-steps`` local steps or on SIGINT/SIGTERM (after the current step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]

log = logging.getLogger("hivemind_peer")


def _wire_bytes(dev: str) -> tuple[int, int]:
    """(tx, rx) bytes of ``dev`` in this network namespace, or zeros when it has none."""
    base = Path("/sys/class/net") / dev / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except (OSError, ValueError):
        return 0, 0


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dht", nargs="*", default=[], metavar="MADDR", help="bootstrap DHT multiaddr(s)")
    p.add_argument("--host", default="127.0.0.1", help="address the DHT (and averagers) listen on")
    p.add_argument("--task", choices=("shakespeare-char", "tiny"), default="shakespeare-char")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="Lion learning rate (allreduce's outer_lr)")
    p.add_argument("--peers", type=int, default=4, help="wait for this many peers before training")
    p.add_argument("--target-batch-size", type=int, default=None, help="default peers x batch x 8")
    p.add_argument("--data-shard", type=int, default=0)
    p.add_argument("--num-data-shards", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--run-id", default="lioncub-bench-hivemind")
    p.add_argument("--device-name", default="veth0", help="network device whose counters are reported")
    p.add_argument("--snapshot-dir", type=Path, default=None, help="save the parameters here (snap-STEP.pt)")
    p.add_argument("--snapshot-every", type=int, default=8, help="local steps between snapshots")
    p.add_argument("--verbose", action="store_true", help="hivemind's own progress logs")
    p.add_argument("--progress", choices=("jsonl", "none"), default="jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    if not 0 <= args.data_shard < args.num_data_shards or args.batch_size < 1 or args.peers < 1:
        print("error: bad --data-shard/--num-data-shards/--batch-size/--peers", file=sys.stderr)
        return 2
    # hivemind 1.1.12 re-exports little at the top level: import from submodules (DESIGN.md section 6).
    from hivemind.compression.floating import Float16Compression
    from hivemind.dht import DHT
    from hivemind.optim.optimizer import Optimizer

    from lioncub.optim import Lion
    from lioncub.peer.tasks import get_task

    torch.manual_seed(args.seed)
    task = get_task(args.task)
    model = task.make_model(args.seed)
    data = task.batches(args.data_shard, args.num_data_shards, args.batch_size, args.seed)
    target = args.target_batch_size or args.peers * args.batch_size * 8

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    dht = DHT(initial_peers=args.dht, host_maddrs=[f"/ip4/{args.host}/tcp/0"], client_mode=False, start=True)
    opt: Any = None
    try:
        opt = Optimizer(
            dht=dht,
            run_id=args.run_id,
            target_batch_size=target,
            batch_size_per_step=args.batch_size,
            params=model.parameters(),
            optimizer=lambda params: Lion(params, lr=args.lr),
            grad_compression=Float16Compression(),
            state_averaging_compression=Float16Compression(),
            client_mode=False,  # explicit: hivemind 1.1.12 crashes when it is left to default
            verbose=args.verbose,
        )
        # After the Optimizer: its averagers set SIGINT to SIG_IGN in *this* process when they start.
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        _emit(
            {
                "event": "started",
                "peer_id": str(dht.peer_id),
                "run_id": args.run_id,
                "maddrs": maddrs,
                "round": 0,
                "endpoint": args.host,
                "target_batch_size": target,
            }
        )
        _wait_for_peers(dht, args.peers, args.start_timeout, stop)
        return _train(args, task, model, data, opt, stop)
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


async def _known_peers(_dht: Any, node: Any) -> int:
    # Runs inside the DHT process (module level, so it pickles by name).
    return len(node.protocol.routing_table.uid_to_peer_id)


def _wait_for_peers(dht: Any, peers: int, timeout: float, stop: threading.Event) -> None:
    """Wait (bounded) until this node's DHT routing table holds the other peers and the bootstrap."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        if int(dht.run_coroutine(_known_peers)) >= peers:
            return
        stop.wait(0.5)
    log.warning("started without all %d peers after %.0f s", peers, timeout)


def _snapshot(directory: Path, model: Any, step: int, samples: int) -> None:
    """Write the flat parameters atomically as ``snap-STEP.pt`` (for the bench's validation curve)."""
    directory.mkdir(parents=True, exist_ok=True)
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters() if p.requires_grad])
    doc = {"params": flat, "step": step, "samples": samples, "wall_time": time.time()}
    tmp = directory / f".snap-{step:08d}.tmp"
    torch.save(doc, tmp)
    tmp.replace(directory / f"snap-{step:08d}.pt")


def _train(
    args: argparse.Namespace, task: Any, model: Any, data: Any, opt: Any, stop: threading.Event
) -> int:
    start = time.perf_counter()
    initial_loss = float(task.evaluate(model, max_batches=8))
    tx0, rx0 = _wire_bytes(args.device_name)
    compute_s, samples, steps = 0.0, 0, 0
    limit = args.max_steps if args.max_steps is not None else 10**9
    while steps < limit and not stop.is_set():
        t = time.perf_counter()
        model.train()
        opt.zero_grad()
        loss = task.loss(model, next(data))
        loss.backward()
        compute_s += time.perf_counter() - t
        opt.step()
        steps += 1
        samples += args.batch_size
        if args.snapshot_dir is not None and steps % max(1, args.snapshot_every) == 0:
            _snapshot(args.snapshot_dir, model, steps, samples)
        tx, rx = _wire_bytes(args.device_name)
        wall = time.perf_counter() - start
        _emit(
            {
                "event": "round",
                "peer_id": str(opt.dht.peer_id),
                "round": int(opt.local_epoch),
                "loss": float(loss.detach()),
                "group_size": int(opt.tracker.global_progress.num_peers),
                "bytes_sent": tx - tx0,
                "bytes_received": rx - rx0,
                "bytes_kind": "wire",
                "wall_s": wall,
                "samples": samples,
                "compute_utilization": compute_s / wall if wall > 0 else 0.0,
            }
        )
    final_loss = float(task.evaluate(model, max_batches=8))
    wall = time.perf_counter() - start
    tx, rx = _wire_bytes(args.device_name)
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    _emit(
        {
            "event": "finished",
            "peer_id": str(opt.dht.peer_id),
            "run_id": args.run_id,
            "rounds_completed": int(opt.local_epoch),
            "initial_loss": initial_loss,
            "final_loss": final_loss,
            "bytes_sent": tx - tx0,
            "bytes_received": rx - rx0,
            "bytes_kind": "wire",
            "compute_s": compute_s,
            "wall_s": wall,
            "samples": samples,
            "compute_utilization": round(compute_s / max(wall, 1e-9), 4),
            "groups_formed": None,
            "rounds_alone": None,
            "anchor_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
