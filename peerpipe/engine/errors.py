"""Errors raised by the engine. Each message tells the user what to do next."""

from peerpipe.errors import PeerpipeError


class EngineError(PeerpipeError):
    """Base of every engine error."""


class UnsupportedModelError(EngineError):
    """The checkpoint's architecture or one of its options is not one the engine runs."""


class ModelLoadError(EngineError):
    """The model folder or one of its files is missing, unreadable or inconsistent."""


class DeviceError(ModelLoadError):
    """The device asked for (``--device``) does not exist here, or this PyTorch cannot use it."""


class TokenizerError(EngineError):
    """The tokenizer or chat template could not be loaded or rendered."""


class CacheError(EngineError):
    """A request does not fit the KV cache (too many sessions or positions)."""


class InvalidSamplingParams(EngineError, ValueError):
    """A sampling parameter is out of range; the message names it and the allowed range."""
