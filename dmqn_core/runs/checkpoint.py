"""A run's checkpoint files: their names, and reading and writing them safely.

dmqn_core.training writes them; everything that reads a run back (the Run handle, resuming a
training) reads them through here.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dmqn_core.errors import DmqnError, exception_summary
from dmqn_core.workspace import atomic_write_bytes

# The two files of a run's directory (training's Checkpoint hook, dmqn_core.training.hooks, writes them atomically).
CHECKPOINT = "checkpoint.pt"  # everything needed to resume: model, optimiser, step, RNG, configs
BEST = "best.pt"  # the weights of the best validation epoch, used for test and eval


def load_checkpoint(path: Path, keys: tuple[str, ...] = ("model_state",)) -> dict[str, Any]:
    """A checkpoint written by training (dmqn_core.training.hooks.Checkpoint), which must hold ``keys``.

    Checkpoints hold only tensors and plain Python values (dicts, lists, numbers, strings), so
    they are read with torch's weights-only unpickler: a file that names any other Python object
    (whose unpickling could run code, e.g. os.system) is refused before anything of it runs.
    Unreadable files become one DmqnError instead of an unpickler's or a zip reader's traceback.
    """
    if not path.exists():
        raise DmqnError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # Foreign pickles make torch warn about their protocol before it refuses them below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message names the first object it refused as "GLOBAL module.name".
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise DmqnError(
                f"checkpoint {path} is not a safe checkpoint: it would load the Python object "
                f"{refused.group(1)}, and dmqn loads only tensors and plain values"
            ) from None
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint (it does not unpickle)") from None
    except EOFError:
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint (it ends too early)") from None
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint ({exception_summary(exc)})") from None
    missing = [key for key in keys if not isinstance(value, dict) or key not in value]
    if missing:
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint (no {', '.join(missing)})")
    return value


def restore_weights(model: torch.nn.Module, checkpoint: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's model_state into ``model``; weights of another model are a DmqnError."""
    try:
        model.load_state_dict(checkpoint["model_state"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DmqnError(
            f"checkpoint {path} does not fit the run's {type(model).__name__} ({exception_summary(exc)})"
        ) from None


def save_checkpoint(value: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically: readers see the previous file or the new one, never a part."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(path, buffer.getvalue())
