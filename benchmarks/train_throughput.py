"""Training throughput and peak memory of DMQN and the baselines it is compared with (issue 6, targets 1-2).

For every model and history length L this script times training steps — forward, backward and
Adam step, batch B = 256, default ModelConfig dimensions — on the CPU in one process, and reports
training samples/s, samples per CPU-second and the peak resident memory of that process. Batches
look like BatchLoader's: a positive and a negative share one history (BatchLoader encodes a shared
history once), so a batch holds H = B/2 histories, all of exactly L behaviors here (item ids by
Zipf-like popularity, each item with a fixed category; the positive is an item of its history,
the negative a popular item). Building the batches is not timed.

Each (model, L) runs in a fresh subprocess, so the peak memory is that configuration's alone.
dmqn and din-full alternate (dmqn, din-full, dmqn, din-full, ... `--repeats` times each) before
the other models at the same L, so their ratio is measured side by side under the same machine
load; the ratio printed is the median of the per-pair ratios. Warm-up steps are not timed.
On a machine shared with other work, wall-clock samples/s moves with the load; samples per
CPU-second (process CPU time, all threads) measures what the steps themselves cost, and with
`--threads 1` it is close to what an idle core would give. Nothing here runs in CI, and no
timing goes into a test.

    python benchmarks/train_throughput.py                                  # every model, L = 200, 1000, 5000
    python benchmarks/train_throughput.py --models dmqn,din-full --lengths 1000 --steps 20 --out tp.json
    python benchmarks/train_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from dmqn_core.config import ModelConfig
from dmqn_core.models.registry import build_model

MODELS = ("din-short", "din-full", "sim", "eta", "twin", "dmqn-simple", "dmqn")
LENGTHS = (200, 1000, 5000)
PAIRED = ("dmqn", "din-full")  # measured alternately: their ratio is the target of issue 6
# Vocabulary of the synthetic `small` set (dmqn synth --scale small): about 19k items, 400
# categories; 4 behavior types + padding. The item table's size sets the cost of Adam's step.
N_ITEMS, N_CATEGORIES, N_BEHAVIOR_TYPES = 20_000, 400, 5


def make_batch(
    rng: np.random.Generator, item_category: np.ndarray, popularity: np.ndarray, batch_size: int, length: int
) -> dict[str, torch.Tensor]:
    """One training batch as BatchLoader builds it: H = batch_size / 2 full histories (H, L), B candidates."""
    H, L = batch_size // 2, length
    items = rng.choice(len(popularity), size=(H, L), p=popularity) + 1  # (H, L), ids 1..n_items-1
    # Increasing timestamps with gaps from seconds to days (SIM's and TWIN's time buckets see all ranges).
    gaps = np.exp(rng.uniform(0.0, 12.0, size=(H, L))).astype(np.int64)
    gaps[:, 0] = 0
    positives = items[np.arange(H), rng.integers(0, L, size=H)]  # (H,) an item of the history
    negatives = rng.choice(len(popularity), size=H, p=popularity) + 1  # (H,)
    candidates = np.stack([positives, negatives], axis=1).reshape(-1)  # (B,) positive, negative, ...
    return dict(
        hist_item=torch.from_numpy(items),
        hist_category=torch.from_numpy(item_category[items]),
        hist_behavior=torch.from_numpy(rng.integers(1, N_BEHAVIOR_TYPES, size=(H, L))),
        hist_timestamp=torch.from_numpy(1_500_000_000 + gaps.cumsum(axis=1)),
        hist_mask=torch.ones(H, L, dtype=torch.bool),
        hist_index=torch.arange(H).repeat_interleave(2),  # (B,) both candidates of a pair share one history
        cand_item=torch.from_numpy(candidates),
        cand_category=torch.from_numpy(item_category[candidates]),
    )


def measure(
    model_name: str, length: int, batch_size: int, warmup: int, steps: int, threads: int, seed: int
) -> dict[str, float]:
    """Train `warmup` untimed then `steps` timed steps in this process.

    Returns samples/s of wall-clock time, samples per CPU-second of this process (all its threads;
    what the steps cost whatever else the machine runs) and the peak resident memory (MB).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = ModelConfig(n_items=N_ITEMS, n_categories=N_CATEGORIES, n_behavior_types=N_BEHAVIOR_TYPES)
    popularity = 1.0 / np.arange(1, N_ITEMS) ** 0.8  # Zipf-like, over ids 1..N_ITEMS-1
    popularity /= popularity.sum()
    item_category = np.concatenate([[0], rng.integers(1, N_CATEGORIES, size=N_ITEMS - 1)])  # (n_items,)
    batches = [make_batch(rng, item_category, popularity, batch_size, length) for _ in range(2)]
    labels = torch.tensor([1.0, 0.0]).repeat(batch_size // 2)  # (B,)

    model = build_model(model_name, config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: dict[str, torch.Tensor]) -> None:
        # What dmqn_core.training.train._train_epoch does per batch (eq. 2 + the model's auxiliary loss).
        loss = F.binary_cross_entropy_with_logits(model(**batch), labels) + model.auxiliary_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    started, started_cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(batches[i % len(batches)])
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {
        "samples_per_s": steps * batch_size / seconds,
        "samples_per_cpu_s": steps * batch_size / cpu_seconds,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": peak_kb / 1024,
    }


def run_child(model_name: str, length: int, args: argparse.Namespace) -> dict[str, float]:
    """measure() in a fresh interpreter, so that ru_maxrss is this configuration's peak alone."""
    command = [
        sys.executable,
        __file__,
        "--child",
        model_name,
        str(length),
        "--batch-size",
        str(args.batch_size),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name} at L={length} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def schedule(models: list[str], repeats: int) -> list[str]:
    """dmqn and din-full alternating `repeats` times each (where both are listed), then the others once."""
    paired = [m for m in PAIRED if m in models]
    order = paired * repeats if len(paired) == 2 else [m for m in models if m in paired]
    return order + [m for m in models if m not in paired]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated history lengths L")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per step (H = B/2 histories)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of dmqn and din-full per L")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads [default: every core this process may use]",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = measure(
            args.child[0], int(args.child[1]), args.batch_size, args.warmup, args.steps, args.threads, args.seed
        )
        print(json.dumps(result))
        return

    models = [m for m in args.models.split(",") if m]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.batch_size < 2 or args.batch_size % 2:
        parser.error("--batch-size must be even (a positive and a negative per history)")
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads"
    print(
        f"{machine}; batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps; "
        f"load average at start {load_average()}",
        flush=True,
    )

    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for length in lengths:
        for model_name in schedule(models, args.repeats):
            result = run_child(model_name, length, args)
            runs.setdefault((model_name, length), []).append(result)
            print(
                f"  L={length:>5} {model_name:<12} {result['samples_per_s']:>9,.1f} samples/s "
                f"{result['samples_per_cpu_s']:>9,.1f} per CPU s {result['peak_mb']:>8,.0f} MB peak   "
                f"(load {load_average()})",
                flush=True,
            )

    def median(model_name: str, length: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(model_name, length)])

    ratios: dict[str, dict[int, float]] = {"samples_per_s": {}, "samples_per_cpu_s": {}}
    if all(m in models for m in PAIRED):
        for key, by_length in ratios.items():
            for length in lengths:
                pairs = zip(runs[("dmqn", length)], runs[("din-full", length)])
                by_length[length] = statistics.median(a[key] / b[key] for a, b in pairs)

    print()
    print("| model | " + " | ".join(f"L={n} samples/s | per CPU s | peak MB" for n in lengths) + " |")
    print("| --- | " + " | ".join("---: | ---: | ---:" for _ in lengths) + " |")
    for model_name in models:
        cells = [
            f"{median(model_name, n, 'samples_per_s'):,.0f} | {median(model_name, n, 'samples_per_cpu_s'):,.0f}"
            f" | {median(model_name, n, 'peak_mb'):,.0f}"
            for n in lengths
        ]
        print(f"| {model_name} | " + " | ".join(cells) + " |")
    for length in ratios["samples_per_s"]:
        print(
            f"dmqn / din-full at L={length}: {ratios['samples_per_s'][length]:.2f} wall-clock, "
            f"{ratios['samples_per_cpu_s'][length]:.2f} per CPU second "
            f"(medians of {args.repeats} side-by-side pairs)"
        )
    print(f"load average at end {load_average()}")

    if args.out:
        report = {
            "machine": machine,
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "steps": args.steps,
            "threads": args.threads,
            "seed": args.seed,
            "load_average_end": load_average(),
            "runs": [{"model": m, "L": n, **r} for (m, n), rs in runs.items() for r in rs],
            "ratio_dmqn_din_full": {
                key: {str(n): r for n, r in by_length.items()} for key, by_length in ratios.items()
            },
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
