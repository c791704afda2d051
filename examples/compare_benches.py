"""Δ test AUC and GAUC, with the 95 % paired bootstrap interval, between a model of one bench and models of
another bench on the same prepared set: what `dmqn bench --against` does inside one bench, for two benches
that differ in a setting (e.g. DMQN with short_term = "din" in its own bench, against the baselines).

    python examples/compare_benches.py BENCH_A MODEL_A BENCH_B MODEL_B [MODEL_B ...] [-w WORKSPACE]

Each model's runs (one per seed of its bench) are averaged, as in a bench's table.
"""

from __future__ import annotations

import argparse
import json
import sys

from dmqn_core.errors import DmqnError
from dmqn_core.runs.run import Run
from dmqn_core.training.evaluate import split_logits
from dmqn_core.training.metrics import paired_bootstrap
from dmqn_core.workspace import Workspace


def bench_logits(ws: Workspace, bench: str, model: str) -> tuple[list, Run]:
    """The test logits of each finished run of ``model`` in ``bench`` (from its bench.json), and one run."""
    path = ws.root / "benches" / bench / "bench.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise DmqnError(f"no readable bench {bench!r} at {path}: {exc}") from None
    run_ids = next((row["run_ids"] for row in rows if row["model"] == model), [])
    if not run_ids:
        raise DmqnError(f"bench {bench!r} has no finished run of {model!r}")
    runs = [Run.open(ws, run_id) for run_id in run_ids]
    return [split_logits(run) for run in runs], runs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_a")
    parser.add_argument("model_a")
    parser.add_argument("bench_b")
    parser.add_argument("models_b", nargs="+")
    parser.add_argument("-w", "--workspace", default=None)
    args = parser.parse_args()
    ws = Workspace(args.workspace)
    a, run_a = bench_logits(ws, args.bench_a, args.model_a)
    test = run_a.data.split("test")
    for model in args.models_b:
        b, run_b = bench_logits(ws, args.bench_b, model)
        if run_b.data.fingerprint != run_a.data.fingerprint:
            raise DmqnError(f"{args.bench_b}'s {model} was trained on another data set than {args.bench_a}")
        diff = paired_bootstrap(test.user, test.label, a, b)
        print(
            f"{args.model_a} ({args.bench_a}) - {model} ({args.bench_b}): "
            + "  ".join(
                f"{name} {d.delta:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
                for name, d in (("Δ AUC", diff["auc"]), ("Δ GAUC", diff["gauc"]))
            )
        )


if __name__ == "__main__":
    try:
        main()
    except DmqnError as exc:
        sys.exit(f"error: {exc}")
