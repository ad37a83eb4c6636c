"""Throughput of the sign1 codec and the packed majority vote against plain numpy.

Every rate is GB/s of fp32-equivalent input: ``numel * 4`` bytes per vector divided by the best of
``--repeat`` wall-clock timings (the 16-way vote counts all 16 vectors). The baselines do the same
work on the same data in the same run:

* pack: ``np.packbits(x >= 0, bitorder="little")`` (the comparison included);
* unpack: ``np.unpackbits`` to the same ``±1`` float32 output (``numpy_unpackbits_raw_gbps`` is
  ``np.unpackbits`` alone, to 0/1 bytes);
* vote16: ``np.unpackbits`` of each vector summed into a counter, compared with half the voters and
  both result planes packed again.

Usage: ``python bench/codec.py [--numel N] [--repeat K] [--json] [--plot PATH]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lioncub.optim.codecs import SignCodec
from lioncub.optim.vote import majority_vote

VOTERS = 16
DEFAULT_PLOT = Path(__file__).resolve().parent / "out" / "codec.png"


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: allocator, lookup tables, thread pool
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def numpy_vote(packed: list[np.ndarray], numel: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.zeros(numel, dtype=np.uint16)
    for bits in packed:
        counts += np.unpackbits(bits, count=numel, bitorder="little")
    twice = 2 * counts.astype(np.int32)
    sign = np.packbits(twice > len(packed), bitorder="little")
    nonzero = np.packbits(twice != len(packed), bitorder="little")
    return sign, nonzero


def measure(numel: int, repeat: int, seed: int = 0) -> dict[str, Any]:
    codec = SignCodec()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen)
    x_np = x.numpy()
    enc = codec.encode(x)
    packed_np = np.packbits(x_np >= 0, bitorder="little")
    if not np.array_equal(enc.data.numpy(), packed_np):
        raise RuntimeError("sign1 encoding differs from numpy.packbits")
    parts = [codec.encode(torch.randn(numel, generator=gen)) for _ in range(VOTERS)]
    parts_np = [p.data.numpy() for p in parts]

    def numpy_unpack() -> np.ndarray:
        return np.unpackbits(packed_np, count=numel, bitorder="little").astype(np.float32) * 2 - 1

    seconds = {
        "pack": best_seconds(lambda: codec.encode(x), repeat),
        "numpy_packbits": best_seconds(lambda: np.packbits(x_np >= 0, bitorder="little"), repeat),
        "unpack": best_seconds(lambda: codec.decode(enc), repeat),
        "numpy_unpackbits": best_seconds(numpy_unpack, repeat),
        "numpy_unpackbits_raw": best_seconds(
            lambda: np.unpackbits(packed_np, count=numel, bitorder="little"), repeat
        ),
        "vote16": best_seconds(lambda: majority_vote(parts), repeat),
        "numpy_vote16": best_seconds(lambda: numpy_vote(parts_np, numel), repeat),
    }
    gigabytes = {key: numel * 4 / 1e9 * (VOTERS if "vote16" in key else 1) for key in seconds}
    result: dict[str, Any] = {f"{key}_gbps": round(gigabytes[key] / s, 3) for key, s in seconds.items()}
    result.update(
        pack_vs_numpy=round(seconds["numpy_packbits"] / seconds["pack"], 3),
        unpack_vs_numpy=round(seconds["numpy_unpackbits"] / seconds["unpack"], 3),
        vote16_vs_numpy=round(seconds["numpy_vote16"] / seconds["vote16"], 3),
        numel=numel,
        voters=VOTERS,
        repeat=repeat,
        torch=torch.__version__,
        numpy=np.__version__,
        threads=torch.get_num_threads(),
    )
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ["pack", "unpack", "vote16"]
    ours = [result[f"{t}_gbps"] for t in tasks]
    base = [
        result[f"numpy_{'packbits' if t == 'pack' else 'unpackbits' if t == 'unpack' else t}_gbps"]
        for t in tasks
    ]
    xs = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs - 0.2, ours, 0.4, label="lioncub")
    ax.bar(xs + 0.2, base, 0.4, label="numpy")
    ax.set_xticks(xs, tasks)
    ax.set_ylabel("GB/s of fp32 input")
    ax.set_title(f"sign1 codec, {result['numel']:,} elements, {result['threads']} threads")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20, help="elements per vector")
    parser.add_argument("--repeat", type=int, default=10, help="timings per case; the best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="bar chart PNG path")
    parser.add_argument("--no-plot", action="store_true", help="skip the chart")
    args = parser.parse_args()
    if args.numel < 1 or args.repeat < 1:
        parser.error("--numel and --repeat must be >= 1")
    result = measure(args.numel, args.repeat)
    if not args.no_plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
