"""Errors the HTTP API answers with, in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peerpipe.errors import PeerpipeError


@dataclass
class ApiError(PeerpipeError):
    """A request the API refuses; ``status`` is the HTTP status, the rest is OpenAI's error object."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{param}: {what} is not supported by peerpipe", "invalid_request_error", "unsupported", param)


class ListenError(PeerpipeError):
    """The HTTP server cannot bind its address (in use, or not this machine's)."""
