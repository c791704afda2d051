"""Which device a command computes on, and in which precision (docs/gpu.md).

``auto``, every command's default, is resolved when the command starts: the first CUDA device when
this torch build sees one, else the CPU. What a run records is the resolved device, never ``auto``,
so that `dmqn runs show` says where it trained.
"""

from __future__ import annotations

import contextlib
import re

import torch

from dmqn_core.errors import DmqnError

AUTO = "auto"
PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str) -> str:
    """``auto`` as this machine resolves it (``cuda`` or ``cpu``); any other device checked and returned as given."""
    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def check_device(device: str) -> None:
    """A DmqnError unless ``device`` is cpu, or a CUDA device this machine has."""
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device, flags=re.ASCII):
        raise DmqnError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise DmqnError(f"--device {device} was asked for but this torch build sees no CUDA device")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise DmqnError(f"--device {device}: this machine shows {torch.cuda.device_count()} CUDA device(s)")


def check_precision(precision: str, device: str) -> None:
    """A DmqnError unless ``precision`` is fp32, or bf16 on a CUDA device that computes in bfloat16."""
    if precision not in PRECISIONS:
        raise DmqnError(f"precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and not device.startswith("cuda"):
        # CPU autocast exists, but it is slower than fp32 on the CPUs this project runs on and untested here.
        raise DmqnError(f"--precision bf16 needs a CUDA device; this command runs on {device} (use fp32)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DmqnError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic (use fp32)")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's precision: bf16 autocast for ``bf16`` (checked by check_precision to be on CUDA), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: str) -> str:
    """The device for a summary line: ``cuda:0 (NVIDIA H100 80GB HBM3)``, or ``cpu``."""
    if not device.startswith("cuda"):
        return device
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
