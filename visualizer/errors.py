"""Errors a person can act on: one base class, and one place that turns any failure into a message.

The CLI prints `user_message(error)` as one line; the UI shows it as a toast. Anything that is not a
`VisualizerError` (or out-of-memory) is a bug and keeps its traceback in the server log.
"""
from __future__ import annotations

class VisualizerError(Exception):
    """A problem with what was asked (settings, model reference, input file) or what the model did;
    its message says what to do."""


class SettingsError(VisualizerError, ValueError):
    """A setting out of range or of the wrong kind."""


class UnknownSamplerError(SettingsError):
    """A sampler name that is not in the registry (or does not fit the model)."""


class ModelLoadError(VisualizerError, RuntimeError):
    """A model reference that cannot be loaded."""


class NonFiniteError(VisualizerError, RuntimeError):
    """The model produced NaN or infinite values."""


class ReplicaLost(VisualizerError, RuntimeError):
    """The model replica running a run stopped (killed, crashed, its node lost) before the run finished."""

    def __str__(self) -> str:
        return "The model replica running this run stopped unexpectedly; run it again (another replica takes it)."


class RunExpired(VisualizerError, KeyError):
    """A run id the app no longer holds."""

    def __str__(self) -> str:
        return "This run is no longer in memory (the app keeps only the most recent ones). Generate it again."


OUT_OF_MEMORY = "Out of memory: try a smaller size, fewer samplers or fewer steps."


def user_message(error: BaseException) -> str | None:
    """The one-line message a person should see for `error`, or None if it is a bug (keep the traceback)."""
    if isinstance(error, VisualizerError):
        return str(error)
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower()):
        return OUT_OF_MEMORY
    return None
