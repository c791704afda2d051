"""Serving latency of DMQN: scoring from the cached user state vs recomputing it (section 2.5).

For history lengths L = 100, 1000, 5000 this script trains a DMQN run on a synthetic log whose
users all have more than 5,000 behaviors, exports every user's state to the embedded SQLite
store and to Redis (export users/s, on one thread and on --export-threads), and measures the
latency of scoring C = 1, 100, 1000 candidates for one user:

  cache/embedded   CachedScorer reading the state from the workspace's SQLite file
  cache/redis      CachedScorer reading the state from a Redis server
  full             the whole model: the user's last L behaviors (from the in-memory prepared
                   set, so the history fetch is free here) -> MCQM + ICIM -> CTAM + MLP

p50 and p99 over repeated calls with random users and candidates, the three paths taking turns
on the same requests in one process, plus the process's peak resident memory. Nothing here runs
in CI.

    python benchmarks/serving.py                      # starts a private redis-server if installed
    python benchmarks/serving.py --redis redis://127.0.0.1:6379/0 --calls 300 --out serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dmqn_core.data.batches import gather_histories
from dmqn_core.data.prep import prepare
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.data.synth import SynthScale, write_log
from dmqn_core.runs.run import Run
from dmqn_core.serving.cache import CachedScorer, export_states
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

LENGTHS = (100, 1000, 5000)
CANDIDATES = (1, 100, 1000)
# Every user longer than the longest L, so that each L really encodes L behaviors.
LONG_HISTORIES = SynthScale(
    n_users=300, n_items=20_000, n_categories=400, n_topics=40, mean_length=6_000, max_length=7_000, min_length=5_200
)


@contextmanager
def private_redis() -> Iterator[str | None]:
    """A throwaway redis-server on a free loopback port, or None where none is installed."""
    server = shutil.which("redis-server")
    if server is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                directory,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def interleaved_latencies(
    paths: dict[str, Callable[[int, np.ndarray], object]], pick: Callable[[], tuple], calls: int, warmup: int = 5
) -> dict[str, np.ndarray]:
    """Milliseconds per call of every path, the paths taking turns on the same request.

    Round-robin on identical requests keeps the comparison side by side: a burst of load from
    elsewhere on the machine hits every path alike instead of whichever happened to be running.
    """
    out = {name: np.empty(calls) for name in paths}
    for i in range(-warmup, calls):
        request = pick()
        for name, path in paths.items():
            started = time.perf_counter()
            path(*request)
            if i >= 0:
                out[name][i] = (time.perf_counter() - started) * 1e3
    return out


def full_model_scorer(workspace: Workspace, run_id: str, max_len: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """Score like a service without the cache: the history -> encode_user -> score, every call."""
    run = Run.open(workspace, run_id)
    model, data = run.model(), run.data

    def score(user_index: int, item_index: np.ndarray) -> np.ndarray:
        users = np.array([user_index])
        histories = gather_histories(data, users, np.asarray(data.user_offsets[users]), max_len)
        item, category, behavior, timestamp, mask = (torch.from_numpy(a) for a in histories)
        with torch.no_grad():
            state = model.encode_user(item, category, behavior, mask, timestamp)
            logits = model.score(
                state,
                torch.from_numpy(item_index),
                torch.from_numpy(np.asarray(data.item_category[item_index], dtype=np.int64)),
                torch.zeros(len(item_index), dtype=torch.long),
                # Popularity now, as the cached scorer reads it (match features).
                torch.from_numpy(np.asarray(data.item_popularity[item_index], dtype=np.int64)),
            )
        return torch.sigmoid(logits).numpy()

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, help="reuse this workspace (default: a temporary one)")
    parser.add_argument("--redis", help="redis://host:port/db (default: a private redis-server, if installed)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per cell (half of them at L=5000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one request per core)")
    parser.add_argument(
        "--export-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads of the timed exports, beside one thread (default: every core, as dmqn export-cache)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory() as tmp, private_redis() as own_redis:
        redis_url = args.redis or own_redis
        ws = Workspace(args.workspace or Path(tmp) / "ws").ensure()
        if not ws.dataset_path("serving").exists():
            log = ws.root / "long-histories.csv"
            print(
                f"writing a synthetic log with {LONG_HISTORIES.n_users} users of >= {LONG_HISTORIES.min_length} "
                "behaviors ...",
                file=sys.stderr,
            )
            write_log(log, LONG_HISTORIES, seed=args.seed)
            prepare(log, "taobao", "serving", workspace=ws, max_len=max(LENGTHS), train_targets=2, seed=args.seed)
        rng = np.random.default_rng(args.seed)
        results = []
        for L in LENGTHS:
            print(f"L = {L}: training DMQN (1 epoch) and exporting ...", file=sys.stderr)
            run = train(
                ws, "serving", "dmqn", {}, {"epochs": 1, "max_len": L, "seed": args.seed, "inspect_users": 0}
            ).run_id
            exports = {}
            for threads in sorted({1, args.export_threads}):
                # Export is a batch job: `dmqn export-cache` runs on all of torch's threads (one share of
                # each batch per thread); one thread gives the per-core figure.
                torch.set_num_threads(threads)
                exports[f"embedded, {threads} thread(s)"] = export_states(ws, run)
                if redis_url:
                    exports[f"redis, {threads} thread(s)"] = export_states(ws, run, to=redis_url)
            torch.set_num_threads(args.threads)
            data = Run.open(ws, run).data
            scorers = {"cache/embedded": CachedScorer(ws, run)}
            if redis_url:
                scorers["cache/redis"] = CachedScorer(ws, run, source=redis_url)
            full = full_model_scorer(ws, run, L)
            paths: dict[str, Callable[[int, np.ndarray], object]] = {
                name: (
                    lambda user, items, scorer=scorer, data=data: scorer.score(
                        int(data.raw_user(user)), data.raw_item(items)
                    )
                )
                for name, scorer in scorers.items()
            }
            paths["full"] = full
            for C in CANDIDATES:

                def pick(C: int = C, data: PreparedSet = data) -> tuple[int, np.ndarray]:
                    return int(rng.integers(1, data.n_users + 1)), rng.choice(
                        np.arange(1, data.n_items + 1), C, replace=False
                    )

                calls = args.calls if L < 5000 else max(args.calls // 2, 20)
                results.append({"L": L, "C": C, **interleaved_latencies(paths, pick, calls)})
            for scorer in scorers.values():
                scorer.close()
            results[-1]["exports"] = {
                name: (e.users_per_s, e.bytes / max(e.total_users, 1)) for name, e in exports.items()
            }

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(results, peak_mb, args)


def report(results: list[dict], peak_mb: float, args: argparse.Namespace) -> None:
    paths = [p for p in ("cache/embedded", "cache/redis", "full") if p in results[0]]
    header = "| L | C | " + " | ".join(f"{p} p50 / p99 (ms)" for p in paths) + " | full / embedded (p50) |"
    lines = [header, "|" + "---|" * (len(paths) + 3)]
    rows_json = []
    for row in results:
        cells = [f"{np.percentile(row[p], 50):.2f} / {np.percentile(row[p], 99):.2f}" for p in paths]
        ratio = np.percentile(row["full"], 50) / np.percentile(row["cache/embedded"], 50)
        lines.append(f"| {row['L']} | {row['C']} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
        rows_json.append(
            {
                "L": row["L"],
                "C": row["C"],
                **{
                    p: {
                        "p50_ms": float(np.percentile(row[p], 50)),
                        "p99_ms": float(np.percentile(row[p], 99)),
                        "calls": len(row[p]),
                    }
                    for p in paths
                },
            }
        )
    lines += ["", "| L | store, threads | export users/s | bytes per user |", "|---|---|---|---|"]
    exports = []
    for row in results:
        for name, (per_s, per_user) in row.get("exports", {}).items():
            lines.append(f"| {row['L']} | {name} | {per_s:,.0f} | {per_user:,.0f} |")
            exports.append({"L": row["L"], "store": name, "users_per_s": per_s, "bytes_per_user": per_user})
    lines += [
        "",
        f"peak resident memory: {peak_mb:,.0f} MB; torch threads: {args.threads} (latency), "
        f"{args.export_threads} (export); calls per cell: {args.calls}",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"latency": rows_json, "exports": exports, "peak_mb": peak_mb, "threads": args.threads}, indent=2
            )
        )


if __name__ == "__main__":
    main()
