"""The host's HTTP face: OpenAI-compatible API, dashboard, live feed and Prometheus metrics."""

from peerpipe.api.errors import ApiError, ListenError
from peerpipe.api.server import ApiServer

__all__ = ["ApiError", "ApiServer", "ListenError"]
