"""Errors of the distributed data plane."""

from peerpipe.errors import PeerpipeError


class InferenceError(PeerpipeError):
    """Base of every inference error."""


class NotReadyError(InferenceError):
    """The room has no plan that every stage has loaded (yet)."""


class TaskFailedError(InferenceError):
    """A stage reported an error, vanished, or did not answer in time."""


class StageLoadError(InferenceError):
    """This node cannot take the stage a plan gives it."""
