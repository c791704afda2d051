"""What a bench reports: its rows (one per model, its finished runs' metrics over the seeds, optionally
compared with one model's), and the paper's Tables 2 and 3 written from them (markdown and CSV) with
bench.json. ``bench`` trains the runs; this module only reads them back (the run store, the test
predictions of --against)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.progress import Progress
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunRecord, RunStore
from dmqn_core.training.evaluate import split_logits
from dmqn_core.training.metrics import PairedDifference, paired_bootstrap
from dmqn_core.workspace import Workspace, atomic_write_bytes

# Table 3: the ablation beside the two strongest baselines of the paper.
TABLE3_MODELS = ("twin-v2", "din-full", "dmqn-simple", "dmqn")
# Replicates of the paired bootstrap of `--against` (the 2.5 and 97.5 percentiles of 2,000 draws move by
# about 0.001 AUC between bootstrap seeds on a 700-user test set) and its fixed seed.
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


@dataclass
class BenchRow:
    """One model of a bench: its metrics over the seeds."""

    model: str
    run_ids: list[str]
    auc: list[float]
    gauc: list[float]
    logloss: list[float]
    train_samples_per_s: float | None
    infer_samples_per_s: float | None
    n_parameters: int | None
    best_epochs: list[int]
    failed: list[str] = field(default_factory=list)  # run ids that did not finish
    # Δ test AUC and GAUC against the bench's --against model ("auc", "gauc"), seeds averaged, with the
    # 95 % interval of a paired bootstrap over test users; None without --against or without runs.
    against: dict[str, PairedDifference] | None = None


@dataclass
class BenchReport:
    name: str
    dataset: str
    directory: Path
    budget: dict[str, Any]
    machine: str
    rows: list[BenchRow]
    trained: int
    reused: int
    failures: list[str]
    against: str | None = None

    def table2(self) -> list[BenchRow]:
        return self.rows

    def table3(self) -> list[BenchRow]:
        by_model = {row.model: row for row in self.rows}
        return [by_model[m] for m in TABLE3_MODELS if m in by_model]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None when fewer than 2 values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


TABLE2_COLUMNS = ("model", "runs", "test AUC", "GAUC", "logloss", "train/s", "infer/s", "params")
# Added to Table 2 by --against MODEL: the difference of each model minus MODEL and its 95 % interval.
AGAINST_COLUMNS = ("Δ AUC", "Δ AUC 95% CI", "Δ GAUC", "Δ GAUC 95% CI")


def table2_columns(against: str | None) -> tuple[str, ...]:
    return TABLE2_COLUMNS + (AGAINST_COLUMNS if against else ())


def _against_cells(row: BenchRow) -> list[str]:
    if row.against is None:
        return ["-"] * len(AGAINST_COLUMNS)
    return [
        text
        for metric in ("auc", "gauc")
        for text in (
            f"{row.against[metric].delta:+.4f}",
            f"[{row.against[metric].low:+.4f}, {row.against[metric].high:+.4f}]",
        )
    ]


TABLE3_COLUMNS = ("model", "runs", "test AUC", "GAUC", "Δ AUC vs dmqn-simple")


def table2_cells(rows: list[BenchRow], against: str | None = None) -> list[list[str]]:
    return [
        [
            r.model,
            str(len(r.auc)),
            format_mean_std(r.auc),
            format_mean_std(r.gauc),
            format_mean_std(r.logloss),
            _rate(r.train_samples_per_s),
            _rate(r.infer_samples_per_s),
            "-" if r.n_parameters is None else f"{r.n_parameters:,}",
            *(_against_cells(r) if against else []),
        ]
        for r in rows
    ]


def table3_cells(rows: list[BenchRow]) -> list[list[str]]:
    reference = next((mean_std(r.auc)[0] for r in rows if r.model == "dmqn-simple"), None)
    cells = []
    for r in rows:
        mean = mean_std(r.auc)[0]
        delta = "-" if mean is None or reference is None else f"{mean - reference:+.4f}"
        cells.append([r.model, str(len(r.auc)), format_mean_std(r.auc), format_mean_std(r.gauc), delta])
    return cells


def markdown_table(columns: tuple[str, ...], cells: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(columns) - 1)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _csv_rows(rows: list[BenchRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "model",
            "runs",
            "auc_mean",
            "auc_std",
            "gauc_mean",
            "gauc_std",
            "logloss_mean",
            "logloss_std",
            "train_samples_per_s",
            "infer_samples_per_s",
            "parameters",
            "best_epochs",
            "run_ids",
            # Empty without --against (and in the row of the --against model itself).
            *(f"delta_{metric}{part}" for metric in ("auc", "gauc") for part in ("", "_low", "_high")),
        ]
    )
    for r in rows:
        writer.writerow(
            [
                r.model,
                len(r.auc),
                *mean_std(r.auc),
                *mean_std(r.gauc),
                *mean_std(r.logloss),
                r.train_samples_per_s,
                r.infer_samples_per_s,
                r.n_parameters,
                " ".join(map(str, r.best_epochs)),
                " ".join(r.run_ids),
                *(
                    value
                    for metric in ("auc", "gauc")
                    for value in (
                        (r.against[metric].delta, r.against[metric].low, r.against[metric].high)
                        if r.against
                        else (None, None, None)
                    )
                ),
            ]
        )
    return out.getvalue()


def describe_budget(budget: dict[str, Any], seeds: list[int]) -> str:
    t, m = budget["train"], budget["model"]
    text = (
        f"seeds {', '.join(map(str, seeds))}; at most {t['epochs']} epochs, early stopping after {t['patience']} "
        f"without a better validation AUC; batch {t['batch_size']}; Adam lr {t['lr']} (constant), weight decay "
        f"{t['weight_decay']}; max_len {t['max_len']}; embedding dim {m['embed_dim']}; MLP {list(m['mlp_hidden'])}"
    )
    # Signals every model gets alike (issue 19); .get: benches registered before the settings existed.
    short_term = m.get("short_term") or "each model's own"
    text += f"; short-term {short_term}; match features {'on' if m.get('match_features') else 'off'}"
    if "precision" in t:  # fp32 is left out of the budget (budget_of)
        text += f"; {t['precision']} autocast"
    for model, tuned in budget.get("tuned", {}).items():
        settings = ", ".join(
            f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"
            for name, value in {**tuned["model"], **tuned["train"]}.items()
        )
        text += f"; {model} tuned (study {tuned['study']}, trial {tuned['trial']}): {settings}"
    return text


def write_tables(report: BenchReport, seeds: list[int]) -> None:
    """table2.md/.csv, table3.md/.csv and bench.json in the bench's directory, each written atomically."""
    report.directory.mkdir(parents=True, exist_ok=True)
    header = (
        f"Data set `{report.dataset}`, bench `{report.name}`. Budget: {describe_budget(report.budget, seeds)}. "
        f"Machine: {report.machine}. Mean ± sample std over seeds; train/s and infer/s are samples per second, "
        f"averaged over the epochs (training) and measured on the test pass (inference)."
    )
    if report.against:
        header += (
            f" Δ: each model minus {report.against} (seeds averaged) on the same test samples, with the 95 % "
            f"interval of a paired bootstrap over test users ({BOOTSTRAP_REPLICATES:,} replicates)."
        )
    header += "\n\n"
    files = {
        "table2.md": header
        + markdown_table(table2_columns(report.against), table2_cells(report.table2(), report.against)),
        "table2.csv": _csv_rows(report.table2()),
        "table3.md": header + markdown_table(TABLE3_COLUMNS, table3_cells(report.table3())),
        "table3.csv": _csv_rows(report.table3()),
        "bench.json": json.dumps(
            {
                "name": report.name,
                "dataset": report.dataset,
                "seeds": seeds,
                "budget": report.budget,
                "machine": report.machine,
                "against": report.against,
                "rows": [asdict(r) for r in report.rows],
            },
            indent=2,
        )
        + "\n",
    }
    for filename, text in files.items():
        atomic_write_bytes(report.directory / filename, text.encode())


def compare_rows(
    workspace: Workspace,
    data: PreparedSet,
    rows: list[BenchRow],
    against: str,
    device: str,
    progress: Progress,
    n_boot: int = BOOTSTRAP_REPLICATES,
) -> None:
    """Set each row's ``against``: its finished runs' test predictions against those of the model
    ``against``, paired sample by sample (every run of a bench scores the same test split)."""
    by_model = {row.model: row for row in rows}
    if not by_model[against].run_ids:
        return
    test = data.split("test")

    def logits(run_id: str) -> np.ndarray:
        run = Run.open(workspace, run_id)
        if run.data.fingerprint != data.fingerprint:
            raise DmqnError(f"run {run_id} was trained on another data set than the bench's {data.path}")
        return split_logits(run, "test", device)

    reference = [logits(run_id) for run_id in by_model[against].run_ids]
    others = [row for row in rows if row.model != against and row.run_ids]
    progress.start(f"paired bootstrap against {against}", len(others))
    for row in others:
        row.against = paired_bootstrap(
            test.user, test.label, [logits(r) for r in row.run_ids], reference, n_boot=n_boot, seed=BOOTSTRAP_SEED
        )
        progress.advance(1)
    progress.stop()


def bench_row(store: RunStore, model: str, run_ids: list[str | None]) -> BenchRow:
    records: list[RunRecord] = [store.get_run(r) for r in run_ids if r and store.has_run(r)]
    done = [r for r in records if r.status == "finished"]
    train_rates, infer_rates = [], []
    for record in done:
        history = store.metric_history(record.run_id)
        rates = [v for epoch, split, metric, v in history if split == "train" and metric == "samples_per_s"]
        if rates:
            train_rates.append(statistics.fmean(rates))
        tests = [
            v
            for epoch, split, metric, v in history
            if split == "test" and metric == "samples_per_s" and epoch is not None
        ]
        if tests:
            infer_rates.append(tests[-1])
    return BenchRow(
        model=model,
        run_ids=[r.run_id for r in done],
        # A finished run has all three (RunRecorder.finish records them); the filters say so to the type checker.
        auc=[r.test_auc for r in done if r.test_auc is not None],
        gauc=[r.test_gauc for r in done if r.test_gauc is not None],
        logloss=[r.test_logloss for r in done if r.test_logloss is not None],
        train_samples_per_s=statistics.fmean(train_rates) if train_rates else None,
        infer_samples_per_s=statistics.fmean(infer_rates) if infer_rates else None,
        n_parameters=done[0].n_parameters if done else None,
        best_epochs=[r.best_epoch for r in done if r.best_epoch is not None],
        failed=[r.run_id for r in records if r.status != "finished"]
        + ["(not started)"] * (len(run_ids) - len(records)),
    )
