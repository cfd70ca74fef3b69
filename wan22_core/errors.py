"""Exceptions the engine raises on purpose; nodes and the CLI turn them into one-line messages."""
import torch


class Wan22Error(Exception):
    """Base class: an expected failure with a message meant for the user."""


class Cancelled(Wan22Error):
    """The caller's cancel check returned True; the run stopped between two steps."""


class NumericalError(Wan22Error):
    """NaN or Inf appeared in the latents."""


class OutOfMemory(Wan22Error):
    """The device (or host) ran out of memory; what we allocated was freed before raising."""


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or a RuntimeError that says so (CPU, MPS, ROCm, older torch)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
