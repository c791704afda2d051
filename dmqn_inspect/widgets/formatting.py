"""How ids, times and codewords are written in every view, so that the views read alike."""

from __future__ import annotations

from datetime import datetime, timezone

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

# One colour per codeword (cycling), so that a codeword looks the same in the timeline, the
# clusters table and both charts. Fixed colours rather than theme variables: Rich renderables
# inside tables and charts cannot see Textual's theme.
_CODEWORD_COLOURS = ("#5fafff", "#ffaf5f", "#87d787", "#ff87af", "#d7c35f", "#af87ff", "#5fd7d7", "#d78787")


def codeword_text(codeword: int) -> Text:
    return Text(str(codeword), style=_CODEWORD_COLOURS[codeword % len(_CODEWORD_COLOURS)], justify="right")


def number_text(value: int | float, digits: int | None = None) -> Text:
    """A count with thousands separators, or a fraction with ``digits`` decimals; right-aligned."""
    text = f"{value:,}" if digits is None else f"{value:.{digits}f}"
    return Text(text, justify="right")


def id_text(value: int) -> Text:
    """An id as it is typed (no separators), right-aligned."""
    return Text(str(int(value)), justify="right")


def utc_minute(timestamp: int) -> str:
    return datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%d %H:%M")


def utc_day(timestamp: int) -> str:
    return datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%d")


def categories_text(top_categories: list[tuple[int, int]]) -> str:
    """'7×12 3×5': category id × how many of the cluster's behaviors have it, most frequent first."""
    return " ".join(f"{category}×{count}" for category, count in top_categories)


class HorizontalBar:
    """A bar of ``value / peak`` of the width it is given, drawn in eighths of a cell.

    Unlike Rich's Bar it paints no background, so the unfilled part takes the widget's own colour;
    any value above 0 shows at least an eighth, so that a rarely used codeword is told from a dead one.
    """

    def __init__(self, value: float, peak: float, colour: str) -> None:
        self.value = value
        self.peak = peak
        self.colour = colour

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        eighths = round(8 * options.max_width * self.value / self.peak) if self.peak > 0 else 0
        if self.value > 0:
            eighths = max(eighths, 1)
        full, rest = divmod(min(eighths, 8 * options.max_width), 8)
        yield Segment("█" * full + (_EIGHTHS[rest] if rest else ""), Style(color=self.colour))
        yield Segment.line()


_EIGHTHS = " ▏▎▍▌▋▊▉"
