"""Training and inference throughput and peak memory of DMQN and the baselines it is compared with (issues 6, 14).

For every model and history length L this script times training steps — forward, backward and
Adam step, batch B = 256, default ModelConfig dimensions — on the CPU in one process, and reports
training samples/s, samples per CPU-second and the peak resident memory of that process; then
inference steps of the same batches as `dmqn eval` runs them (model.eval(), torch.no_grad()
forward). For dmqn (and dmqn-reference) it also times MCQM's forward + backward alone and prints
the GFLOP/s of its matmuls next to the GFLOP/s of one dense torch.matmul of the same total FLOPs
in the same process: how far from the machine's matmul speed the quantizer runs. Batches
look like BatchLoader's: a positive and a negative share one history (BatchLoader encodes a shared
history once), so a batch holds H = B/2 histories, all of exactly L behaviors here (item ids by
Zipf-like popularity, each item with a fixed category; the positive is an item of its history,
the negative a popular item). Building the batches is not timed.

Each (model, L) runs in a fresh subprocess, so the peak memory is that configuration's alone.
dmqn and din-full alternate (dmqn, din-full, dmqn, din-full, ... `--repeats` times each) before
the other models at the same L, so their ratio is measured side by side under the same machine
load; the ratio printed is the median of the per-pair ratios. `--reference` adds dmqn-reference
(DMQN whose quantizer trains through mcqm_reference, the plain PyTorch of eq. 3-10, on the same noise)
to each alternating round, so that the fused quantizer's gain is measured side by side too. Warm-up
steps are not timed.
On a machine shared with other work, wall-clock samples/s moves with the load; samples per
CPU-second (process CPU time, all threads) measures what the steps themselves cost, and with
`--threads 1` it is close to what an idle core would give. Nothing here runs in CI, and no
timing goes into a test.

    python benchmarks/train_throughput.py                      # every model, L = 200, 1000, 5000, 10000
    python benchmarks/train_throughput.py --models dmqn,din-full --lengths 1000 --steps 20 --out tp.json
    python benchmarks/train_throughput.py --models dmqn,din-full --lengths 1000,5000 --reference
    python benchmarks/train_throughput.py --threads 1
    python benchmarks/train_throughput.py --device cuda --models dmqn,din-full --lengths 1000,5000

With --device cuda the steps run on the GPU (timed between torch.cuda.synchronize() calls) and each
configuration also reports its peak CUDA memory, torch.cuda.max_memory_allocated (tensors only, not the
allocator's cache or the CUDA context).
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
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dmqn_core.config import ModelConfig
from dmqn_core.devices import check_device, describe
from dmqn_core.errors import DmqnError
from dmqn_core.models.dmqn import mcqm_reference
from dmqn_core.models.dmqn.fused_mcqm import draw_seed, fill_gumbel
from dmqn_core.models.dmqn.mcqm import QuantizerOutput
from dmqn_core.models.registry import build_model

MODELS = ("din-short", "din-full", "sim", "eta", "twin", "dmqn-simple", "dmqn")
LENGTHS = (200, 1000, 5000, 10000)
PAIRED = ("dmqn", "din-full")  # measured alternately: their ratio is the target of issues 6 and 14
REFERENCE = "dmqn-reference"  # dmqn with MCQM's reference path (--reference), in every alternating round
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
        # The candidates' behaviors before the sample (match features); only their cost matters here.
        cand_popularity=torch.from_numpy(rng.integers(0, 1000, size=len(candidates))),
    )


def build(model_name: str, config: ModelConfig) -> torch.nn.Module:
    """The registry's model; dmqn-reference is dmqn whose quantizer trains through mcqm_reference."""
    if model_name != REFERENCE:
        return build_model(model_name, config)
    model = build_model("dmqn", config)
    quantizer = model.quantizer
    fused_forward = quantizer.forward

    def reference_forward(e: torch.Tensor, mask: torch.Tensor, with_usage: bool = False) -> QuantizerOutput:
        if not quantizer.training:
            return fused_forward(e, mask, with_usage)  # inference is dmqn's
        H, L, _ = e.shape
        N, W, _ = quantizer.codebooks.shape
        # The noise a fused forward would draw: one seed from the global generator, fill_gumbel over the batch.
        gumbel = None if quantizer.assign_noise == "none" else fill_gumbel(e.new_empty(H, L, N, W), draw_seed(), 0)
        out = mcqm_reference.quantize(
            e,
            mask,
            quantizer.codebooks,
            quantizer.proj,
            tau=quantizer.tau,
            assign_noise=quantizer.assign_noise,
            tau_placement=quantizer.tau_placement,
            straight_through=quantizer.straight_through,
            gumbel=gumbel,
        )
        size = out.cluster_size
        return QuantizerOutput(out.clusters, size > 0, size, out.mean_prob if with_usage else None)

    quantizer.forward = reference_forward
    return model


def matmul_flops(model_name: str, histories: int, length: int, config: ModelConfig) -> float:
    """FLOPs of the matmuls of one MCQM forward + backward, for M = H L behaviors.

    fused (5 x 2 M D N W): forward scores; backward recomputed scores, dp = e G^T, ds @ folded,
    ds^T e; the scatter-add pooling and its gather are no matmul and not counted. reference: the
    projection h = e W_2 (2 M N D^2) and its two gradients, the scores h c^T and the one-hot
    pooling forward (2 M D N W each) and four backward matmuls of that size: d(one-hot), de of the
    pooling, dh and dc of the scores.
    """
    M, D, N, W = histories * length, config.embed_dim, config.n_codebooks, config.codebook_size
    if model_name == REFERENCE:
        return 6 * 2.0 * M * D * N * W + 3 * 2.0 * M * N * D * D
    return 5 * 2.0 * M * D * N * W


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock read after it counts that work (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantizer_speed(model: torch.nn.Module, model_name: str, batch: dict[str, torch.Tensor], steps: int) -> dict:
    """MCQM forward + backward alone on the batch's embedded histories: achieved matmul GFLOP/s next to
    the GFLOP/s of one dense (n, n) x (n, n) torch.matmul of the same total FLOPs, in this process, on the
    batch's device."""
    config = model.config
    mask = batch["hist_mask"]
    device = mask.device
    with torch.no_grad():
        e = model.embedding.behaviors(batch["hist_item"], batch["hist_category"], batch["hist_behavior"], mask)
    e.requires_grad_(True)
    H, L, _ = e.shape
    grad = torch.randn(H, config.n_codebooks, config.codebook_size, config.embed_dim, device=device)

    def fwd_bwd() -> None:
        (model.quantizer(e, mask).clusters * grad).sum().backward()

    fwd_bwd()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        fwd_bwd()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    flops = matmul_flops(model_name, H, L, config)
    n = round((flops / 2) ** (1 / 3))
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        torch.matmul(a, b)
    synchronize(device)
    matmul_seconds = (time.perf_counter() - started) / steps
    return {
        "mcqm_seconds": seconds,
        "mcqm_gflops": flops / seconds / 1e9,
        "matmul_n": n,
        "matmul_gflops": 2.0 * n**3 / matmul_seconds / 1e9,
    }


def measure(
    model_name: str, length: int, batch_size: int, warmup: int, steps: int, threads: int, seed: int, device: str
) -> dict[str, float]:
    """Train `warmup` untimed then `steps` timed steps in this process, then time `steps` inference steps.

    Returns samples/s of wall-clock time, samples per CPU-second of this process (all its threads;
    what the steps cost whatever else the machine runs), both for training and inference, the peak
    resident memory (MB) of training, on CUDA the peak CUDA memory (MB) of training, and for dmqn the
    MCQM GFLOP/s (quantizer_speed).
    """
    target = torch.device(device)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = ModelConfig(n_items=N_ITEMS, n_categories=N_CATEGORIES, n_behavior_types=N_BEHAVIOR_TYPES)
    popularity = 1.0 / np.arange(1, N_ITEMS) ** 0.8  # Zipf-like, over ids 1..N_ITEMS-1
    popularity /= popularity.sum()
    item_category = np.concatenate([[0], rng.integers(1, N_CATEGORIES, size=N_ITEMS - 1)])  # (n_items,)
    batches = [
        {name: t.to(target) for name, t in make_batch(rng, item_category, popularity, batch_size, length).items()}
        for _ in range(2)
    ]
    labels = torch.tensor([1.0, 0.0], device=target).repeat(batch_size // 2)  # (B,)

    model = build(model_name, config).to(target).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: dict[str, torch.Tensor]) -> None:
        # What dmqn_core.training.trainer.Trainer.train_epoch does per batch (eq. 2 + the model's auxiliary loss).
        loss = F.binary_cross_entropy_with_logits(model(**batch), labels) + model.auxiliary_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(run: Callable[[dict[str, torch.Tensor]], object]) -> tuple[float, float]:
        for i in range(warmup):
            run(batches[i % len(batches)])
        synchronize(target)
        started, started_cpu = time.perf_counter(), time.process_time()
        for i in range(steps):
            run(batches[i % len(batches)])
        synchronize(target)
        return time.perf_counter() - started, time.process_time() - started_cpu

    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    seconds, cpu_seconds = timed(step)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux; training's peak
    peak_cuda = torch.cuda.max_memory_allocated(target) if target.type == "cuda" else None
    model.eval()  # what dmqn_core.training.evaluate does: eval mode, no autograd
    with torch.no_grad():
        infer_seconds, infer_cpu_seconds = timed(lambda batch: model(**batch))
    result = {
        "samples_per_s": steps * batch_size / seconds,
        "samples_per_cpu_s": steps * batch_size / cpu_seconds,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": peak_kb / 1024,
        "infer_samples_per_s": steps * batch_size / infer_seconds,
        "infer_samples_per_cpu_s": steps * batch_size / infer_cpu_seconds,
    }
    if peak_cuda is not None:
        result["peak_cuda_mb"] = peak_cuda / 2**20
    if model_name in ("dmqn", REFERENCE):
        result.update(quantizer_speed(model.train(), model_name, batches[0], steps))
    return result


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
        "--device",
        args.device,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name} at L={length} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def schedule(models: list[str], repeats: int) -> list[str]:
    """dmqn, din-full (and dmqn-reference) alternating `repeats` times each where listed, then the others once."""
    paired = [m for m in (*PAIRED, REFERENCE) if m in models]
    order = paired * repeats if all(m in models for m in PAIRED) else paired
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
        "--reference", action="store_true", help="also measure dmqn-reference (MCQM's reference path), alternating"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads [default: every core this process may use]",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [default: cpu]")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = measure(
            args.child[0],
            int(args.child[1]),
            args.batch_size,
            args.warmup,
            args.steps,
            args.threads,
            args.seed,
            args.device,
        )
        print(json.dumps(result))
        return

    models = [m for m in args.models.split(",") if m] + ([REFERENCE] if args.reference else [])
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.batch_size < 2 or args.batch_size % 2:
        parser.error("--batch-size must be even (a positive and a negative per history)")
    if args.device != "cpu":
        try:
            check_device(args.device)
        except DmqnError as exc:
            parser.error(str(exc))
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads"
    if args.device != "cpu":
        machine += f", {describe(args.device)}"
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
            mcqm = (
                f"; MCQM {result['mcqm_gflops']:.1f} GFLOP/s vs matmul {result['matmul_gflops']:.1f}"
                if "mcqm_gflops" in result
                else ""
            )
            cuda_peak = f", {result['peak_cuda_mb']:,.0f} MB CUDA peak" if "peak_cuda_mb" in result else ""
            print(
                f"  L={length:>5} {model_name:<14} train {result['samples_per_s']:>8,.1f}/s "
                f"{result['samples_per_cpu_s']:>8,.1f} per CPU s {result['peak_mb']:>7,.0f} MB peak{cuda_peak}; "
                f"infer {result['infer_samples_per_s']:>8,.1f}/s {result['infer_samples_per_cpu_s']:>8,.1f} per CPU s"
                f"{mcqm}   (load {load_average()})",
                flush=True,
            )

    def median(model_name: str, length: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(model_name, length)])

    keys = ("samples_per_s", "samples_per_cpu_s", "infer_samples_per_s", "infer_samples_per_cpu_s")
    ratios: dict[str, dict[str, dict[int, float]]] = {}  # model -> key -> L -> median ratio to din-full
    if all(m in models for m in PAIRED):
        for model_name in ("dmqn", REFERENCE):
            if model_name not in models:
                continue
            ratios[model_name] = {
                key: {
                    n: statistics.median(a[key] / b[key] for a, b in zip(runs[(model_name, n)], runs[("din-full", n)]))
                    for n in lengths
                }
                for key in keys
            }

    for title, (wall, cpu) in (("Training", keys[:2]), ("Inference", keys[2:])):
        print(f"\n{title}:")
        print("| model | " + " | ".join(f"L={n} samples/s | per CPU s" for n in lengths) + " |")
        print("| --- | " + " | ".join("---: | ---:" for _ in lengths) + " |")
        for model_name in models:
            cells = [f"{median(model_name, n, wall):,.0f} | {median(model_name, n, cpu):,.0f}" for n in lengths]
            print(f"| {model_name} | " + " | ".join(cells) + " |")
    print("\nPeak resident memory of training (MB):")
    print("| model | " + " | ".join(f"L={n}" for n in lengths) + " |")
    print("| --- | " + " | ".join("---:" for _ in lengths) + " |")
    for model_name in models:
        print(f"| {model_name} | " + " | ".join(f"{median(model_name, n, 'peak_mb'):,.0f}" for n in lengths) + " |")
    if args.device != "cpu":
        print("\nPeak CUDA memory of training (MB, torch.cuda.max_memory_allocated):")
        print("| model | " + " | ".join(f"L={n}" for n in lengths) + " |")
        print("| --- | " + " | ".join("---:" for _ in lengths) + " |")
        for model_name in models:
            cells = " | ".join(f"{median(model_name, n, 'peak_cuda_mb'):,.0f}" for n in lengths)
            print(f"| {model_name} | {cells} |")
    quantizers = [m for m in ("dmqn", REFERENCE) if m in models]
    if quantizers:
        print("\nMCQM forward + backward alone (matmul GFLOP/s; dense torch.matmul of the same FLOPs):")
        print("| model | " + " | ".join(f"L={n} MCQM | matmul | share" for n in lengths) + " |")
        print("| --- | " + " | ".join("---: | ---: | ---:" for _ in lengths) + " |")
        for model_name in quantizers:
            cells = []
            for n in lengths:
                mcqm, dense = median(model_name, n, "mcqm_gflops"), median(model_name, n, "matmul_gflops")
                cells.append(f"{mcqm:.1f} | {dense:.1f} | {mcqm / dense:.0%}")
            print(f"| {model_name} | " + " | ".join(cells) + " |")
    print()
    for model_name, by_key in ratios.items():
        for length in lengths:
            print(
                f"{model_name} / din-full at L={length}: training {by_key['samples_per_s'][length]:.2f} wall-clock, "
                f"{by_key['samples_per_cpu_s'][length]:.2f} per CPU second; inference "
                f"{by_key['infer_samples_per_s'][length]:.2f} wall-clock, "
                f"{by_key['infer_samples_per_cpu_s'][length]:.2f} per CPU second "
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
            "device": args.device,
            "load_average_end": load_average(),
            "runs": [{"model": m, "L": n, **r} for (m, n), rs in runs.items() for r in rs],
            "ratio_to_din_full": {
                model_name: {key: {str(n): r for n, r in by_length.items()} for key, by_length in by_key.items()}
                for model_name, by_key in ratios.items()
            },
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
