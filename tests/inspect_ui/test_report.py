"""`dmqn report`: the HTML report of a tiny DMQN run, its self-containedness, and a headless Chromium rendering it.

The browser tests need Debian's `chromium` (`.ci/run` installs it); without it they are skipped.
They load the report in headless Chromium with a probe script that records every JavaScript error
(window errors, unhandled rejections, console.error) into the page, dump the DOM to count the
rendered plots, and take a screenshot whose pixels must show coloured plots, not a blank page.
A deliberately broken report must fail those same checks.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pytest
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.runs.inspection import RunInspector
from dmqn_core.runs.store import RunStore
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace
from dmqn_inspect.report import GENERATOR_META, SECTIONS, build_report, default_report_path
from dmqn_inspect.report_figures import quantizer_history_figure

MODEL = {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8, "mlp_hidden": [16]}
TRAIN = {"epochs": 2, "max_len": 60, "batch_size": 256, "seed": 4, "inspect_users": 12}
FIGURES = [key for key, _ in SECTIONS]  # every section has a figure for a run with a recorded sample

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def dmqn_run(tiny_workspace) -> str:
    return train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN).run_id


@pytest.fixture(scope="module")
def baseline_run(tiny_workspace) -> str:
    """A second run on the same data set, for the comparison section."""
    return train(tiny_workspace, "tiny", "pop", train_settings={"seed": 0}).run_id


@pytest.fixture(scope="module")
def report(tiny_workspace, dmqn_run, baseline_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = build_report(tiny_workspace, dmqn_run, out)
    assert result.path == out and result.run_id == dmqn_run and result.notes == []
    assert result.size_bytes == out.stat().st_size
    return out


def figure_ids(text: str) -> list[str]:
    return re.findall(r'<div id="figure-([a-z-]+)" class="plotly-graph-div"', text)


def test_report_is_one_self_contained_file(report):
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # no temporary file left behind
    text = report.read_text(encoding="utf-8")
    assert text.count(get_plotlyjs()[:2000]) == 1  # plotly.js inline, exactly once
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.IGNORECASE)  # every script inline
    # Nothing fetched from elsewhere (plotly.js' own source holds URLs of features the report does not use).
    page = text.replace(get_plotlyjs(), "")
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"https?://", page)
    assert figure_ids(text) == FIGURES
    for key, title in SECTIONS:
        assert f'<section id="{key}"><h2>{html.escape(title)}</h2>' in text


def test_report_shows_this_run_beside_the_others(report, dmqn_run, baseline_run):
    text = report.read_text(encoding="utf-8")
    table = text[text.index('<table class="runs">') :]
    assert f'<tr class="this-run"><td>{dmqn_run}</td>' in table and f"<td>{baseline_run}</td>" in table


def test_run_without_recorded_sample_keeps_the_other_sections(tiny_workspace, tmp_path):
    old = train(tiny_workspace, "tiny", "dmqn", MODEL, {**TRAIN, "epochs": 1, "inspect_users": 0}).run_id
    assert RunInspector(tiny_workspace, old).sampled_users() == []
    result = build_report(tiny_workspace, old, tmp_path / "old.html")
    text = result.path.read_text(encoding="utf-8")
    assert [note.split(":")[0] for note in result.notes] == ["cluster-categories", "attention"]
    assert text.count("recorded no sample of users") == 2
    assert figure_ids(text) == [
        "utilisation",
        "usage-history",
        "quantizer-history",
        "projection",
        "training",
        "comparison",
    ]

    # Users named by id are computed from the checkpoint on demand.
    data = PreparedSet.open(RunStore(tiny_workspace.store_path).get_run(old).dataset_path)
    user = int(data.raw_user(np.asarray(data.split("test").user[:1]))[0])
    result = build_report(tiny_workspace, old, tmp_path / "chosen.html", users=[user])
    text = result.path.read_text(encoding="utf-8")
    assert "attention" in figure_ids(text) and f"user {user}:" in text


def test_quantizer_history_plots_every_codebook_and_epoch(tiny_workspace, dmqn_run, tmp_path):
    rows = RunStore(tiny_workspace.store_path).quantizer_stats(dmqn_run)
    figure = quantizer_history_figure(rows)
    agreement = [t for t in figure.data if t.xaxis == "x"]
    margin = [t for t in figure.data if t.xaxis == "x2"]
    assert [t.name for t in agreement] == [f"codebook {n}" for n in range(MODEL["n_codebooks"])]
    for n, (a, m) in enumerate(zip(agreement, margin)):
        assert list(a.x) == list(m.x) == list(range(1, TRAIN["epochs"] + 1))
        assert list(a.y) == [row[2] for row in rows if row[1] == n]
        assert list(m.y) == [row[3] for row in rows if row[1] == n]

    # A run recorded before the statistics existed gets a note instead.
    store_copy = tmp_path / "ws"
    shutil.copytree(tiny_workspace.root, store_copy)
    con = duckdb.connect(str(store_copy / tiny_workspace.store_path.name))
    con.execute("DELETE FROM quantizer_stats")
    con.close()
    result = build_report(Workspace(store_copy), dmqn_run, tmp_path / "old.html")
    assert "quantizer-history: this run recorded no quantizer statistics" in " ".join(result.notes)
    assert "quantizer-history" not in figure_ids(result.path.read_text(encoding="utf-8"))


def test_default_path_replaces_an_older_report(tiny_workspace, dmqn_run):
    out = default_report_path(tiny_workspace, dmqn_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!DOCTYPE html><html><head>{GENERATOR_META}<title>an older report</title></head></html>")
    beside = out.with_name(f".{out.name}.tmp-999999999")  # no name dmqn writes: never deleted
    beside.write_text("half a page")
    result = build_report(tiny_workspace, dmqn_run)
    assert result.path == out == tiny_workspace.root / "reports" / f"{dmqn_run}.html"
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "an older report" not in out.read_text(encoding="utf-8")
    assert beside.read_text() == "half a page"


def test_only_dmqn_runs_have_a_report(tiny_workspace, baseline_run, tmp_path):
    with pytest.raises(DmqnError, match="only dmqn and dmqn-simple"):
        build_report(tiny_workspace, baseline_run, tmp_path / "pop.html")
    assert not (tmp_path / "pop.html").exists()


def test_command_line(tiny_workspace, dmqn_run, tmp_path):
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(
        app, ["report", dmqn_run, "--out", str(out), "--users", "2", "--workspace", str(tiny_workspace.root)]
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "") and " MB" in result.output
    assert figure_ids(out.read_text(encoding="utf-8")) == FIGURES

    result = CliRunner().invoke(app, ["report", "no-such-run", "--workspace", str(tiny_workspace.root)])
    assert result.exit_code == 1 and "no-such-run" in result.output


# -- headless Chromium -------------------------------------------------------------------------------

# Injected first into <head> of a copy of the report: every error lands in an attribute of <html>,
# which --dump-dom serialises.
ERROR_PROBE = """<script>(function () {
  var errors = [];
  function note(text) {
    errors.push(String(text));
    document.documentElement.setAttribute("data-js-errors", JSON.stringify(errors));
  }
  window.addEventListener("error", function (e) { note(e.message || e); });
  window.addEventListener("unhandledrejection", function (e) { note("unhandled rejection: " + e.reason); });
  var consoleError = console.error;
  console.error = function () {
    note("console.error: " + Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () { document.documentElement.setAttribute("data-loaded", "yes"); });
})();</script>"""


def chromium(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    profile = workdir / f"profile-{len(list(workdir.glob('profile-*')))}"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=20000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def browser_check(report: Path, workdir: Path) -> tuple[list[str], int, float]:
    """(JavaScript errors, plots rendered, share of colourful pixels in a screenshot of the top of the page)."""
    probed = workdir / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("<head>", "<head>" + ERROR_PROBE, 1), encoding="utf-8")
    dom = chromium(workdir, "--dump-dom", probed.as_uri()).stdout
    root = re.search(r"<html[^>]*>", dom).group(0)
    errors = json.loads(html.unescape(m.group(1))) if (m := re.search(r'data-js-errors="([^"]*)"', root)) else []
    if 'data-loaded="yes"' not in root:
        errors.append("the page never finished loading")
    body = dom[dom.index("</head>") :]  # plotly.js' own source mentions the class below
    rendered = body.count("js-plotly-plot")
    # 1280×2400 CSS pixels drawn at half scale: the header and the first plots, decoded quickly.
    png = workdir / "screenshot.png"
    chromium(
        workdir, "--window-size=1280,2400", "--force-device-scale-factor=0.5", f"--screenshot={png}", report.as_uri()
    )
    rgb = read_png(png)[..., :3].astype(np.int16)
    colourful = float(((rgb.max(axis=-1) - rgb.min(axis=-1)) >= 64).mean())  # text is grey, plots are coloured
    return errors, rendered, colourful


@needs_chromium
def test_chromium_renders_every_plot_without_errors(report, tmp_path):
    errors, rendered, colourful = browser_check(report, tmp_path)
    assert errors == []
    assert rendered == len(FIGURES)
    assert colourful > 0.01  # measured: 0.03 with plots, 0.003 for the page without them


@needs_chromium
def test_chromium_check_fails_on_a_broken_report(report, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(
        report.read_text(encoding="utf-8").replace(get_plotlyjs(), "this is not javascript"), encoding="utf-8"
    )
    errors, rendered, colourful = browser_check(broken, tmp_path)
    assert any("SyntaxError" in e for e in errors) and any("Plotly is not defined" in e for e in errors)
    assert rendered == 0
    assert colourful < 0.01


def read_png(path: Path) -> np.ndarray:
    """(height, width, channels) uint8 pixels of an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, "only 8-bit RGB(A), non-interlaced"
        elif kind == b"IDAT":
            idat.append(body)
    channels = 3 if color == 2 else 4
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(height, width * channels + 1)
    pixels = np.zeros((height, width * channels), dtype=np.int64)
    prior = np.zeros(width * channels, dtype=np.int64)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if kind == 0:  # None
            current = line
        elif kind == 1:  # Sub: a running sum along each channel
            current = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) & 255
        elif kind == 2:  # Up
            current = (line + prior) & 255
        else:  # Average or Paeth: each byte depends on the one decoded before it
            out, up = line.tolist(), prior.tolist()
            for x in range(len(out)):
                left = out[x - channels] if x >= channels else 0
                if kind == 3:
                    out[x] = (out[x] + ((left + up[x]) >> 1)) & 255
                else:
                    corner = up[x - channels] if x >= channels else 0
                    p = left + up[x] - corner
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - corner)
                    out[x] = (out[x] + (left if pa <= pb and pa <= pc else up[x] if pb <= pc else corner)) & 255
            current = np.array(out, dtype=np.int64)
        pixels[y] = current
        prior = current
    return pixels.astype(np.uint8).reshape(height, width, channels)
