"""Exceptions the engine raises on purpose; nodes and the CLI turn them into one-line messages."""


class Wan22Error(Exception):
    """Base class: an expected failure with a message meant for the user."""


class Cancelled(Wan22Error):
    """The caller's cancel check returned True; the run stopped between two steps."""


class NumericalError(Wan22Error):
    """NaN or Inf appeared in the latents."""
