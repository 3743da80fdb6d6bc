"""What resolving a ``--model`` can raise."""

from __future__ import annotations

from peerpipe.errors import PeerpipeError


class ModelNotFoundError(PeerpipeError):
    """``--model`` names neither a folder nor a model peerpipe knows."""
