"""Errors the planner raises; each says what to change (more memory, fewer sessions, ...)."""

from peerpipe.errors import PeerpipeError


class PlanError(PeerpipeError):
    """Base of every planning error."""


class DoesNotFitError(PlanError):
    """The room's memory cannot hold the model with the requested context and sessions."""

    def __init__(self, message: str, missing_bytes: int) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes


class NoNodesError(PlanError):
    """There is nobody to plan for."""
