"""The Plotly figures of `dmqn report`, one function per section, built from plain arrays.

Every figure uses SVG traces only (no WebGL: `scattergl` fails in headless or GPU-less browsers),
and none reaches outside the page, so the report renders offline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from dmqn_core.models.dmqn.mcqm import CodebookUsage
from dmqn_core.runs.inspection import RunSummary, UserInspection

TEMPLATE = "plotly_white"
# Categories beyond the most frequent ones share one grey, so the legend stays readable.
TOP_CATEGORIES = 10
CATEGORY_COLORS = qualitative.Plotly  # 10 colours, one per top category
OTHER_COLOR = "#c8c8c8"
# Codewords are drawn in black over the coloured items; the marker symbol tells the codebooks apart.
CODEBOOK_SYMBOLS = ("diamond", "square", "triangle-up", "star", "cross", "triangle-down", "pentagon", "hexagon")
CODEBOOK_COLORS = qualitative.Dark24
# Shares of a cluster's first, second and third category, then the rest.
RANK_COLORS = ("#08519c", "#4292c6", "#9ecae1", "#e0e0e0")
# The attention heatmap shows at most this many candidates of a user.
MAX_CANDIDATES = 12


def utilisation_figure(counts: np.ndarray, epoch: int | None) -> go.Figure:
    """Validation behaviors per codeword, one row of bars per codebook; dead codewords marked with a cross."""
    n_codebooks, width = counts.shape
    usage = CodebookUsage.from_counts(counts)  # the statistics training records each epoch
    perplexity, dead = usage.perplexity, usage.dead
    titles = [
        f"codebook {n}: perplexity {perplexity[n]:.1f} of {width}, {dead[n]} dead codeword{'' if dead[n] == 1 else 's'}"
        for n in range(n_codebooks)
    ]
    fig = make_subplots(
        rows=n_codebooks, cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.35 / n_codebooks
    )
    codewords = np.arange(width)
    for n in range(n_codebooks):
        fig.add_trace(
            go.Bar(
                x=codewords,
                y=counts[n],
                marker_color=CODEBOOK_COLORS[n % len(CODEBOOK_COLORS)],
                name=f"codebook {n}",
                showlegend=False,
                hovertemplate="codeword %{x}: %{y:,} behaviors<extra>codebook " + str(n) + "</extra>",
            ),
            row=n + 1,
            col=1,
        )
        dead_codewords = codewords[counts[n] == 0]
        if len(dead_codewords):
            fig.add_trace(
                go.Scatter(
                    x=dead_codewords,
                    y=np.zeros(len(dead_codewords)),
                    mode="markers",
                    marker=dict(symbol="x", color="black", size=8),
                    name="dead codeword",
                    showlegend=False,
                    hovertemplate="codeword %{x}: dead<extra></extra>",
                ),
                row=n + 1,
                col=1,
            )
        fig.update_yaxes(title_text="behaviors", row=n + 1, col=1)
    fig.update_xaxes(title_text="codeword", dtick=max(1, width // 16), row=n_codebooks, col=1)
    when = "the best epoch" if epoch is None else f"epoch {epoch}"
    fig.update_layout(
        template=TEMPLATE,
        height=150 + 170 * n_codebooks,
        bargap=0.15,
        title=f"Validation behaviors assigned to each codeword ({when})",
    )
    return fig


def usage_history_figure(history: Sequence[tuple[int, int, int, int, float]], codebook_size: int) -> go.Figure:
    """Perplexity and dead codewords of each codebook over the epochs."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("perplexity (higher = more codewords in use)", "dead codewords")
    )
    for n in sorted({row[1] for row in history}):
        rows = sorted(row for row in history if row[1] == n)
        epochs = [row[0] for row in rows]
        color = CODEBOOK_COLORS[n % len(CODEBOOK_COLORS)]
        fig.add_trace(
            go.Scatter(
                x=epochs,
                y=[row[4] for row in rows],
                mode="lines+markers",
                name=f"codebook {n}",
                legendgroup=str(n),
                line_color=color,
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=epochs,
                y=[row[3] for row in rows],
                mode="lines+markers",
                name=f"codebook {n}",
                legendgroup=str(n),
                line_color=color,
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.add_hline(
        y=codebook_size,
        line_dash="dot",
        line_color="grey",
        annotation_text=f"uniform use ({codebook_size})",
        # plotly is unannotated: the checker takes row's and col's type from their default, "all".
        row=1,  # pyright: ignore[reportArgumentType]
        col=1,  # pyright: ignore[reportArgumentType]
    )
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(
        template=TEMPLATE, height=380, title="Codebook utilisation over the epochs (validation behaviors)"
    )
    return fig


def quantizer_history_figure(history: Sequence[tuple[int, int, float, float]]) -> go.Figure:
    """Assignment agreement and score margin of each codebook over the epochs (rows of quantizer_stats)."""
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("training codeword = inference codeword", "best minus second-best score"),
    )
    for n in sorted({row[1] for row in history}):
        rows = sorted(row for row in history if row[1] == n)
        epochs = [row[0] for row in rows]
        color = CODEBOOK_COLORS[n % len(CODEBOOK_COLORS)]
        for col, values, legend in ((1, [row[2] for row in rows], True), (2, [row[3] for row in rows], False)):
            fig.add_trace(
                go.Scatter(
                    x=epochs,
                    y=values,
                    mode="lines+markers",
                    name=f"codebook {n}",
                    legendgroup=str(n),
                    line_color=color,
                    showlegend=legend,
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    fig.update_layout(
        template=TEMPLATE, height=380, title="Training vs inference codewords over the epochs (validation sample)"
    )
    return fig


@dataclass
class Projection:
    """2-D coordinates of the codewords (N*W, row n*W + j) and of the sampled items (M)."""

    codewords: np.ndarray  # (N*W, 2)
    items: np.ndarray  # (M, 2)


def projection_figure(
    projection: Projection,
    n_codebooks: int,
    codebook_size: int,
    counts: np.ndarray,
    item_ids: np.ndarray,
    item_categories: np.ndarray,
) -> go.Figure:
    """Items coloured by category (top categories only) with the codewords on top, one symbol per codebook."""
    fig = go.Figure()
    frequent = [category for category, _ in Counter(item_categories.tolist()).most_common(TOP_CATEGORIES)]
    other = ~np.isin(item_categories, frequent)
    if other.any():
        fig.add_trace(
            go.Scatter(
                x=projection.items[other, 0],
                y=projection.items[other, 1],
                mode="markers",
                marker=dict(size=5, color=OTHER_COLOR, opacity=0.6),
                name=f"items of other categories ({int(other.sum()):,})",
                customdata=np.stack([item_ids[other], item_categories[other]], axis=1),
                hovertemplate="item %{customdata[0]}<br>category %{customdata[1]}<extra></extra>",
            )
        )
    for rank, category in enumerate(frequent):
        members = item_categories == category
        fig.add_trace(
            go.Scatter(
                x=projection.items[members, 0],
                y=projection.items[members, 1],
                mode="markers",
                marker=dict(size=6, color=CATEGORY_COLORS[rank % len(CATEGORY_COLORS)], opacity=0.8),
                name=f"category {category} ({int(members.sum()):,} items)",
                customdata=item_ids[members],
                hovertemplate="item %{customdata}<br>category " + str(category) + "<extra></extra>",
            )
        )
    for n in range(n_codebooks):
        rows = slice(n * codebook_size, (n + 1) * codebook_size)
        fig.add_trace(
            go.Scatter(
                x=projection.codewords[rows, 0],
                y=projection.codewords[rows, 1],
                mode="markers",
                marker=dict(
                    size=11,
                    color="black",
                    symbol=CODEBOOK_SYMBOLS[n % len(CODEBOOK_SYMBOLS)],
                    line=dict(color="white", width=1),
                ),
                name=f"codewords of codebook {n}",
                customdata=np.stack([np.arange(codebook_size), counts[n]], axis=1),
                hovertemplate=f"codebook {n}, codeword " + "%{customdata[0]}<br>%{customdata[1]:,} validation behaviors"
                "<extra></extra>",
            )
        )
    fig.update_xaxes(showticklabels=False, title_text="UMAP 1")
    fig.update_yaxes(showticklabels=False, title_text="UMAP 2")
    fig.update_layout(
        template=TEMPLATE,
        height=720,
        legend=dict(itemsizing="constant"),
        title="UMAP of the codewords and the recorded item embeddings",
    )
    return fig


@dataclass
class ClusterCategories:
    """Category counts of the behaviors assigned to each codeword, over the recorded users' histories."""

    n_users: int
    # per codebook, per codeword: Counter of raw category id -> behaviors
    counts: list[list[Counter]]

    @classmethod
    def from_rows(
        cls, rows: Sequence[tuple[int, int, int, int]], n_users: int, n_codebooks: int, codebook_size: int
    ) -> ClusterCategories:
        """rows: (codebook, codeword, category, behaviors), as RunInspector.codeword_categories gives them."""
        counts = [[Counter() for _ in range(codebook_size)] for _ in range(n_codebooks)]
        for codebook, codeword, category, behaviors in rows:
            counts[codebook][codeword][category] += behaviors
        return cls(n_users=n_users, counts=counts)


def cluster_categories_figure(clusters: ClusterCategories) -> go.Figure:
    """Per codebook, one stacked bar per used codeword: the shares of its three most frequent categories and the
    rest."""
    n_codebooks = len(clusters.counts)
    width = len(clusters.counts[0])
    fig = make_subplots(
        rows=1,
        cols=n_codebooks,
        subplot_titles=[f"codebook {n}" for n in range(n_codebooks)],
        horizontal_spacing=0.06 / max(1, n_codebooks - 1) + 0.02,
    )
    rank_names = ("1st category", "2nd category", "3rd category", "other categories")
    for n, per_codeword in enumerate(clusters.counts):
        used = [j for j in range(width) if per_codeword[j]]
        labels = [f"w{j}" for j in used]
        totals = np.array([sum(per_codeword[j].values()) for j in used], dtype=float)
        top = [per_codeword[j].most_common(3) for j in used]
        for rank in range(4):
            if rank < 3:
                share = np.array([t[rank][1] if rank < len(t) else 0 for t in top]) / totals
                text = [f"{t[rank][0]}" if rank < len(t) else "" for t in top]
                hover = [
                    f"codeword {j}: category {t[rank][0]}, {t[rank][1]:,} of {int(total):,} behaviors"
                    if rank < len(t)
                    else ""
                    for j, t, total in zip(used, top, totals)
                ]
            else:
                share = 1.0 - np.array([sum(c for _, c in t) for t in top]) / totals
                text = [""] * len(used)
                hover = [
                    f"codeword {j}: {len(per_codeword[j]) - len(t)} other categories, {s:.0%}"
                    for j, t, s in zip(used, top, share)
                ]
            fig.add_trace(
                go.Bar(
                    y=labels,
                    x=share,
                    orientation="h",
                    marker_color=RANK_COLORS[rank],
                    name=rank_names[rank],
                    legendgroup=rank_names[rank],
                    showlegend=n == 0,
                    text=text,
                    textposition="inside",
                    insidetextanchor="middle",
                    hovertext=hover,
                    hovertemplate="%{hovertext}<extra></extra>",
                ),
                row=1,
                col=n + 1,
            )
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=n + 1)
    fig.update_xaxes(range=[0, 1], tickformat=".0%", title_text="share of the cluster's behaviors")
    fig.update_layout(
        template=TEMPLATE,
        barmode="stack",
        height=170 + 20 * width,
        bargap=0.1,
        uniformtext=dict(minsize=8, mode="hide"),
        legend=dict(orientation="h", y=-0.08),
        title=f"Top categories of each cluster (behaviors of {clusters.n_users:,} sampled users; "
        "labels are raw category ids)",
    )
    return fig


def attention_figure(users: Sequence[UserInspection]) -> go.Figure:
    """One heatmap per user: candidates (rows) × the user's non-empty clusters (columns), CTAM weights."""
    titles = [f"user {user.user_id}: {len(user.item):,} behaviors, {len(user.label)} candidates" for user in users]
    fig = make_subplots(rows=len(users), cols=1, subplot_titles=titles, vertical_spacing=0.25 / len(users))
    rows_total = 0
    for index, user in enumerate(users):
        n_codebooks, width = user.n_codebooks, user.codebook_size
        sizes = np.stack([np.bincount(user.codeword[n], minlength=width) for n in range(n_codebooks)])  # (N, W)
        codebook, codeword = np.nonzero(sizes)
        shown = slice(0, min(len(user.label), MAX_CANDIDATES))
        z = user.attention[shown][:, codebook, codeword]  # (C, clusters)
        x = [f"{n}:{j}" for n, j in zip(codebook, codeword)]
        y = [
            f"item {item} (cat {category}) · {'clicked' if label else 'not clicked'} · p={score:.2f}"
            for item, category, label, score in zip(
                user.candidate_item[shown], user.candidate_category[shown], user.label[shown], user.score[shown]
            )
        ]
        size = np.broadcast_to(sizes[codebook, codeword], z.shape)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=x,
                y=y,
                coloraxis="coloraxis",
                customdata=size,
                hovertemplate="%{y}<br>cluster %{x} (codebook:codeword), %{customdata} behaviors"
                "<br>attention %{z:.3f}<extra></extra>",
            ),
            row=index + 1,
            col=1,
        )
        fig.update_xaxes(type="category", tickangle=-90, tickfont_size=8, row=index + 1, col=1)
        rows_total += z.shape[0]
    fig.update_layout(
        template=TEMPLATE,
        height=140 + 150 * len(users) + 22 * rows_total,
        coloraxis=dict(colorscale="Viridis", colorbar_title="attention"),
        title="CTAM attention of each candidate over the user's non-empty clusters (codebook:codeword)",
    )
    return fig


def training_figure(history: Sequence[tuple[int | None, str, str, float]], best_epoch: int | None) -> go.Figure:
    """Train loss and validation AUC (and GAUC where recorded) per epoch; the best epoch dashed."""

    def series(split: str, name: str) -> tuple[list[int], list[float]]:
        points = sorted((epoch, value) for epoch, s, n, value in history if s == split and n == name and epoch)
        return [p[0] for p in points], [p[1] for p in points]

    fig = make_subplots(rows=1, cols=2, subplot_titles=("train loss (log loss)", "validation AUC"))
    epochs, loss = series("train", "loss")
    fig.add_trace(go.Scatter(x=epochs, y=loss, mode="lines+markers", name="train loss"), row=1, col=1)
    for name in ("auc", "gauc"):
        epochs, values = series("valid", name)
        if values:
            fig.add_trace(
                go.Scatter(x=epochs, y=values, mode="lines+markers", name=f"valid {name.upper()}"), row=1, col=2
            )
    if best_epoch:
        for col in (1, 2):
            # plotly is unannotated: the checker takes row's and col's type from their default, "all".
            fig.add_vline(x=best_epoch, line_dash="dash", line_color="grey", row=1, col=col)  # pyright: ignore[reportArgumentType]
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_layout(
        template=TEMPLATE,
        height=380,
        title="Training curves" + (f" (best epoch {best_epoch}, dashed)" if best_epoch else ""),
    )
    return fig


def comparison_figure(runs: Sequence[RunSummary], run_id: str) -> go.Figure:
    """Test AUC and GAUC of the runs on one data set, this run's bars outlined."""
    tested = [run for run in runs if run.test_auc is not None]
    labels = [f"{run.model} · {run.run_id}" for run in tested]
    outline = [3 if run.run_id == run_id else 0 for run in tested]
    fig = go.Figure()
    for name, values, color in (
        ("test AUC", [run.test_auc for run in tested], "#1f77b4"),
        ("test GAUC", [run.test_gauc for run in tested], "#ff7f0e"),
    ):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=values,
                name=name,
                marker=dict(color=color, line=dict(color="black", width=outline)),
                text=[f"{v:.4f}" if v is not None else "" for v in values],
                textposition="outside",
                hovertemplate="%{x}<br>" + name + " %{y:.4f}<extra></extra>",
            )
        )
    low = min((v for run in tested for v in (run.test_auc, run.test_gauc) if v is not None), default=0.5)
    fig.update_yaxes(range=[max(0.0, low - 0.05), 1.0])
    fig.update_layout(
        template=TEMPLATE,
        barmode="group",
        height=420,
        title="Test metrics of the runs on this data set (this run outlined)",
    )
    return fig
