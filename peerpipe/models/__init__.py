"""Models that ship inside the peerpipe package, and the one way a user's ``--model`` becomes a
folder or a file (``resolve_model``)."""

from peerpipe.models.bundled import (
    BUNDLED,
    BUNDLED_DRAFT,
    PACKAGED,
    bundled_draft_for,
    default_draft_dir,
    default_model_dir,
)
from peerpipe.models.errors import ModelNotFoundError
from peerpipe.models.resolve import resolve_model

__all__ = [
    "BUNDLED",
    "BUNDLED_DRAFT",
    "PACKAGED",
    "ModelNotFoundError",
    "bundled_draft_for",
    "default_draft_dir",
    "default_model_dir",
    "resolve_model",
]
