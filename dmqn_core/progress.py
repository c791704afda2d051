"""How long-running core functions report progress without printing themselves.

The command line passes a rich-based implementation; library users get silence by default.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def start(self, description: str, total: int | None) -> None:
        """Begin a task of ``total`` steps (None: unknown)."""

    def advance(self, steps: int = 1, **info: Any) -> None:
        """Count finished steps; ``info`` (loss, samples_per_s, ...) is shown beside the bar."""

    def stop(self) -> None:
        """The current task is over."""

    def log(self, message: str) -> None:
        """A line worth keeping above the bars (an epoch summary, a warning)."""


class NullProgress:
    """Reports nothing."""

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, steps: int = 1, **info: Any) -> None:
        pass

    def stop(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass
