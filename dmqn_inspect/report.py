"""`dmqn report`: one self-contained HTML page about a trained DMQN run.

The page embeds plotly.js once, inline, and every figure as a div that calls it, so it opens
offline and from an e-mail attachment alike. It is written to a temporary file and renamed into
place, so a killed report leaves the previous file (or none), never half a page. Every page carries
GENERATOR_META in its head: only a file with that mark is replaced without ``overwrite``.
"""

from __future__ import annotations

import html
import os
import stat
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from dmqn_core import __version__
from dmqn_core.errors import DmqnError
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runs.inspection import RunInspector, RunSummary, UserInspection
from dmqn_core.workspace import Workspace, atomic_write_bytes
from dmqn_inspect.report_figures import (
    ClusterCategories,
    Projection,
    attention_figure,
    cluster_categories_figure,
    comparison_figure,
    projection_figure,
    quantizer_history_figure,
    training_figure,
    usage_history_figure,
    utilisation_figure,
)

# UMAP settings. n_neighbors=15 is umap-learn's default: it balances local detail against global
# layout for a few hundred to a few thousand points. Cosine distance, because a behavior goes to
# the codeword with the largest dot product: among UMAP's metrics the angle is the closest to that
# rule (the lengths of the folded codewords and of the item embeddings differ a lot). 200 layout
# epochs (umap-learn's choice for large sets; it uses 500 below 10,000 points) keep the report
# fast without a visible difference. A fixed random_state makes the layout reproducible.
UMAP_NEIGHBORS = 15
UMAP_MIN_DIST = 0.1
UMAP_METRIC = "cosine"
UMAP_EPOCHS = 200
UMAP_SEED = 0
# Fewer points than this make no meaningful projection (below about 5, UMAP's spectral initialisation fails).
UMAP_MIN_POINTS = 10
DEFAULT_ATTENTION_USERS = 4

SECTIONS = (
    ("utilisation", "Codeword utilisation"),
    ("usage-history", "Utilisation over the epochs"),
    ("quantizer-history", "Training vs inference codewords"),
    ("projection", "Codewords and items (UMAP)"),
    ("cluster-categories", "What the clusters hold"),
    ("attention", "Attention of sampled users"),
    ("training", "Training curves"),
    ("comparison", "Other runs on this data set"),
)

# No upload button ("Share chart..." sends the figure to Plotly Cloud): the report stays on this machine.
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "showSendToCloud": False}

# The mark in the head of every report, by which an existing file is known to be one (and so may be replaced).
GENERATOR_META = f'<meta name="generator" content="dmqn report {__version__}">'
_GENERATOR_MARK = b'<meta name="generator" content="dmqn report '
# How reports began before they had the mark (the title follows with the run id).
_UNMARKED_HEAD = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1"><title>DMQN report · '
).encode()
_HEAD_BYTES = 4096  # the mark is within the first few hundred bytes; plotly.js (megabytes) follows


@dataclass
class ReportResult:
    path: Path
    size_bytes: int
    run_id: str
    seconds: float
    notes: list[str] = field(default_factory=list)  # sections that could not be drawn, and why


def default_report_path(workspace: Workspace, run_id: str) -> Path:
    """WORKSPACE/reports/RUN_ID.html: one report per run, kept beside the run it describes."""
    return workspace.root / "reports" / f"{run_id}.html"


def is_dmqn_report(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a symbolic link) that dmqn report wrote: its first
    few KB, the only part read, hold GENERATOR_META (or begin as reports did before it)."""
    try:
        # O_NOFOLLOW: a link is never a report; O_NONBLOCK: a FIFO is refused by fstat, not waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with open(fd, "rb") as fh:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            head = fh.read(_HEAD_BYTES)
        except OSError:
            return False
    return _GENERATOR_MARK in head or head.startswith(_UNMARKED_HEAD)


def check_report_target(out: Path, overwrite: bool) -> None:
    """The DmqnError of a report that may not be written at ``out``.

    An existing file is replaced only when it is a dmqn report, or with ``overwrite``; a symbolic
    link is never written through, and replaced (the link itself, never what it points to) only
    with ``overwrite``. build_report checks before its work and again right before the rename.
    """
    if out.is_symlink():
        if not overwrite:
            raise DmqnError(f"{out} is a symbolic link; pass --overwrite to replace the link (not what it points to)")
    elif out.is_dir():
        raise DmqnError(f"{out} is a directory; name the report's file")
    elif out.exists() and not overwrite and not is_dmqn_report(out):
        raise DmqnError(f"{out} exists and is not a dmqn report; pass --overwrite to replace it")


def build_report(
    workspace: Workspace,
    run_id: str | None = None,
    out: Path | None = None,
    users: int | Sequence[int] = DEFAULT_ATTENTION_USERS,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> ReportResult:
    """Write the HTML report of a dmqn/dmqn-simple run (None: the latest) to ``out`` (None: the default path).

    ``users``: how many of the recorded sample users get an attention heatmap, or the raw ids of
    the users to show (users outside the recorded sample are computed from the checkpoint).
    An existing ``out`` is replaced only when it is a dmqn report, or with ``overwrite`` (see
    check_report_target).
    """
    started = time.perf_counter()
    progress = progress or NullProgress()
    inspector = RunInspector(workspace, run_id)
    out = Path(out) if out is not None else default_report_path(workspace, inspector.run_id)
    # Now rather than when writing: a file that may not be replaced, or a directory that cannot be
    # made, fails before the UMAP, not after it.
    check_report_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = _Page(inspector)

    runs = [RunSummary.of(record) for record in inspector.store.list_runs(dataset=inspector.dataset)]
    this_run = next((run for run in runs if run.run_id == inspector.run_id), None)
    history = inspector.store.metric_history(inspector.run_id)
    best_epoch = _best_epoch(history)

    page.add_figure(
        "utilisation",
        utilisation_figure(inspector.utilisation(), best_epoch),
        "Validation behaviors assigned to each codeword at the best epoch. Perplexity is exp(entropy) of "
        "the usage distribution: W when every codeword is used equally, 1 when all behaviors collapse "
        "into one codeword. A dead codeword gets no behavior at all.",
    )
    usage = inspector.store.codebook_usage(inspector.run_id)
    if usage:
        page.add_figure(
            "usage-history",
            usage_history_figure(usage, inspector.codebook_size),
            "How the codebooks' use evolved while training.",
        )
    else:
        page.add_note("usage-history", "this run recorded no per-epoch codebook utilisation.")
    quantizer = inspector.store.quantizer_stats(inspector.run_id)
    if quantizer:
        page.add_figure(
            "quantizer-history",
            quantizer_history_figure(quantizer),
            "Left: the share of validation behaviors whose codeword on the training path (sampled as the run's "
            "options sample it, e.g. with Gumbel noise) is the one inference takes (the argmax of the scores). "
            "Right: the mean gap between a behavior's best and second-best codeword score; Gumbel noise "
            "(standard deviation 1.28) changes the codeword of behaviors whose gap is smaller than it.",
        )
    else:
        page.add_note(
            "quantizer-history",
            "this run recorded no quantizer statistics (it was trained before they were measured).",
        )

    sampled = inspector.sampled_users()
    # Only the users an attention heatmap can show are read whole; the clusters' categories come
    # from one aggregate over every recorded user.
    # (Users asked for by id are read by _attention_users instead.)
    limit = users if isinstance(users, int) else 0
    progress.start("reading the sampled users", min(len(sampled), limit))
    sample = []
    for user_id in sampled:
        if len(sample) >= limit:
            break
        user = inspector.user(user_id)
        if len(user.label):
            sample.append(user)
            progress.advance()
    progress.stop()

    _add_projection(page, inspector, progress)

    category_rows = inspector.store.codeword_categories(inspector.run_id)
    if category_rows:
        page.add_figure(
            "cluster-categories",
            cluster_categories_figure(
                ClusterCategories.from_rows(category_rows, len(sampled), inspector.n_codebooks, inspector.codebook_size)
            ),
            "For every codeword that holds behaviors of the sampled users, the shares of its three most "
            "frequent categories (labels: raw category ids) and of all other categories. A cluster "
            "dominated by one category is an interpretable interest; an even mix is not.",
        )
    else:
        page.add_note("cluster-categories", _NO_SAMPLE)

    shown = _attention_users(inspector, sample, users)
    if shown:
        page.add_figure(
            "attention",
            attention_figure(shown),
            "Each row is one of the user's test candidates (its click label and the predicted click "
            "probability); each column one of the user's non-empty clusters, labelled codebook:codeword. "
            "Within a codebook the weights of a candidate sum to 1.",
        )
    elif not users:
        page.add_note("attention", "no user was asked for.")
    elif isinstance(users, int) and not sample:
        page.add_note("attention", _NO_SAMPLE)
    else:
        page.add_note("attention", "none of the chosen users has a test candidate.")

    if history:
        page.add_figure(
            "training",
            training_figure(history, best_epoch),
            "Mean training log loss and validation "
            "AUC after every epoch; the test metrics come from the best epoch's weights.",
        )
    else:
        page.add_note("training", "this run recorded no metrics yet.")

    if any(run.run_id != inspector.run_id and run.test_auc is not None for run in runs):
        page.add_figure(
            "comparison",
            comparison_figure(runs, inspector.run_id),
            "Test AUC and GAUC (user-weighted AUC) of every run on the same data set.",
        )
    else:
        page.add_note(
            "comparison",
            f"no other run on {inspector.dataset} has test metrics yet "
            f"(try `dmqn train {inspector.dataset} --model din-short`).",
        )
    page.add_html("comparison", _runs_table(runs, inspector.run_id))

    progress.start("writing the report", None)
    document = page.render(this_run, best_epoch, len(sampled)).encode("utf-8")
    # Checked again: a file may have appeared at ``out``, or changed, while the report was being built.
    atomic_write_bytes(out, document, check=lambda: check_report_target(out, overwrite))
    progress.stop()
    return ReportResult(
        path=out,
        size_bytes=len(document),
        run_id=inspector.run_id,
        seconds=time.perf_counter() - started,
        notes=page.notes,
    )


_NO_SAMPLE = (
    "this run recorded no sample of users (it was trained before `--inspect-users` existed, or with "
    "`--inspect-users 0`); retrain it to see what its clusters hold and how its candidates attend to them."
)


def _best_epoch(history: Sequence[tuple[int | None, str, str, float]]) -> int | None:
    """The epoch the test metrics were measured at (training logs them under the best epoch)."""
    epochs = [epoch for epoch, split, _, _ in history if split == "test" and epoch is not None]
    if epochs:
        return epochs[-1]
    # A run still training: the first epoch with the highest validation AUC, as training picks it.
    valid = [(-value, epoch) for epoch, split, name, value in history if split == "valid" and name == "auc" and epoch]
    return min(valid)[1] if valid else None


def _add_projection(page: _Page, inspector: RunInspector, progress: Progress) -> None:
    codebooks = inspector.codebooks()  # (N, W, D)
    item_ids, item_categories, vectors = inspector.item_embeddings()
    n_codewords = codebooks.shape[0] * codebooks.shape[1]
    if n_codewords + len(item_ids) < UMAP_MIN_POINTS:
        page.add_note(
            "projection", f"too few points for a projection ({n_codewords} codewords, {len(item_ids)} items)."
        )
        return
    points = np.concatenate([codebooks.reshape(n_codewords, -1), vectors]).astype(np.float32)
    progress.start(f"UMAP of {n_codewords:,} codewords and {len(item_ids):,} items", None)
    coordinates = _umap(points)
    progress.stop()
    projection = Projection(codewords=coordinates[:n_codewords], items=coordinates[n_codewords:])
    page.add_figure(
        "projection",
        projection_figure(
            projection,
            inspector.n_codebooks,
            inspector.codebook_size,
            inspector.utilisation(),
            item_ids,
            item_categories,
        ),
        f"UMAP ({UMAP_METRIC} distance, n_neighbors={min(UMAP_NEIGHBORS, len(points) - 1)}, "
        f"random_state={UMAP_SEED}) of the codewords, folded into the behavior-embedding space through "
        "their codebook's projection, together with the recorded sample of item embeddings. Items of "
        "the most frequent categories are coloured, all others grey. Hover for ids.",
    )


def _umap(points: np.ndarray) -> np.ndarray:
    import umap  # imported here: only the projection needs it, and it takes seconds to load

    n_neighbors = min(UMAP_NEIGHBORS, len(points) - 1)
    unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    indices, distances = _cosine_neighbors(unit, n_neighbors)
    with warnings.catch_warnings():
        # "n_jobs value 1 overridden to 1 by setting random_state", "no search index": expected here.
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(
            n_neighbors=n_neighbors,
            min_dist=UMAP_MIN_DIST,
            n_epochs=UMAP_EPOCHS,
            metric=UMAP_METRIC,
            random_state=UMAP_SEED,
            precomputed_knn=(indices, distances),
        )
        return reducer.fit_transform(unit)


def _cosine_neighbors(unit: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbors (each point first, as UMAP expects) of unit vectors by cosine distance.

    UMAP computes these itself for small sets, but through scikit-learn's per-pair Python loop with a
    numba metric: about 20 s for 2,000 points on a busy 2-core machine, against a fraction of a second for one
    matrix product per block.
    """
    n = len(unit)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        d = np.clip(1.0 - unit[start:stop] @ unit.T, 0.0, 2.0)
        d[np.arange(stop - start), np.arange(start, stop)] = -1.0  # the point itself comes first
        nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
        nearest_d = np.take_along_axis(d, nearest, axis=1)
        order = np.argsort(nearest_d, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(nearest, order, axis=1)
        distances[start:stop] = np.maximum(np.take_along_axis(nearest_d, order, axis=1), 0.0)
    return indices, distances


def _attention_users(
    inspector: RunInspector, sample: list[UserInspection], users: int | Sequence[int]
) -> list[UserInspection]:
    if isinstance(users, int):
        return [user for user in sample if len(user.label)][:users]
    known = {user.user_id: user for user in sample}
    chosen = [known.get(user_id) or inspector.user(user_id) for user_id in users]
    return [user for user in chosen if len(user.label)]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _minutes(iso: str) -> str:
    """ISO time text to the minute, in its own time zone."""
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M %Z").strip()
    except ValueError:
        return iso


def _runs_table(runs: Sequence[RunSummary], run_id: str) -> str:
    rows = []
    for run in runs:
        mark = ' class="this-run"' if run.run_id == run_id else ""
        cells = (
            run.run_id,
            run.model,
            run.status,
            _minutes(run.created_at),
            _fmt(run.test_auc),
            _fmt(run.test_gauc),
            _fmt(run.test_logloss),
        )
        rows.append(f"<tr{mark}>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    header = "".join(
        f"<th>{name}</th>" for name in ("run", "model", "status", "created", "test AUC", "test GAUC", "test logloss")
    )
    return f'<table class="runs"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


class _Page:
    """The sections of the report, in SECTIONS order, rendered into one HTML document."""

    def __init__(self, inspector: RunInspector) -> None:
        self.inspector = inspector
        self.parts: dict[str, list[str]] = {key: [] for key, _ in SECTIONS}
        self.notes: list[str] = []

    def add_figure(self, section: str, figure: go.Figure, explanation: str) -> None:
        div = figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"figure-{section}",
            config=PLOT_CONFIG,
            default_height=f"{figure.layout.height}px",
        )
        self.parts[section].append(f'<p class="explain">{html.escape(explanation)}</p>{div}')

    def add_note(self, section: str, text: str) -> None:
        self.notes.append(f"{section}: {text}")
        self.parts[section].append(f'<p class="note">{html.escape(text)}</p>')

    def add_html(self, section: str, fragment: str) -> None:
        self.parts[section].append(fragment)

    def render(self, run: RunSummary | None, best_epoch: int | None, n_sampled: int) -> str:
        inspector = self.inspector
        title = f"DMQN report · {inspector.run_id}"
        facts = [
            ("run", inspector.run_id),
            ("model", inspector.model),
            ("data set", inspector.dataset),
            ("codebooks", f"{inspector.n_codebooks} × {inspector.codebook_size} codewords, D = {inspector.embed_dim}"),
            ("best epoch", "–" if best_epoch is None else str(best_epoch)),
            ("sampled users", f"{n_sampled:,}"),
        ]
        if run is not None:
            facts[3:3] = [("status", run.status), ("created", _minutes(run.created_at))]
            facts.append(
                ("test", f"AUC {_fmt(run.test_auc)} · GAUC {_fmt(run.test_gauc)} · logloss {_fmt(run.test_logloss)}")
            )
        facts.append(("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
        fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
        nav = " · ".join(f'<a href="#{key}">{html.escape(name)}</a>' for key, name in SECTIONS)
        sections = "".join(
            f'<section id="{key}"><h2>{html.escape(name)}</h2>{"".join(self.parts[key])}</section>'
            for key, name in SECTIONS
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR_META}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
            f'<body><header><h1>{html.escape(title)}</h1><table class="facts">{fact_rows}</table>'
            f"<nav>{nav}</nav></header><main>{sections}</main></body></html>\n"
        )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #222; }
h1 { font-size: 1.6em; margin: 24px 0 8px; }
h2 { font-size: 1.25em; margin: 36px 0 4px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table.facts th { text-align: left; padding-right: 16px; font-weight: 600; }
nav { margin: 12px 0; }
p.explain { color: #555; max-width: 1000px; }
p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
table.runs { border-collapse: collapse; margin-top: 12px; }
table.runs th, table.runs td { border-bottom: 1px solid #ddd; padding: 4px 12px; text-align: left; }
table.runs tr.this-run { font-weight: 600; background: #eef4fb; }
"""
