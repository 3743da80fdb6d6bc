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


class PromptError(InferenceError, ValueError):
    """A request the room cannot run as given: a bad prompt, too long for the context, or sampling
    values out of range. The caller's fault; the message names what to change."""


class ContextLengthError(PromptError):
    """The prompt leaves no position for an answer in the room's context."""
