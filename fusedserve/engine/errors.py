"""Typed errors that cross the engine boundary; the server maps each to one OpenAI error response."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for errors the engine raises to its callers."""


class EngineDeadError(EngineError):
    """The engine thread has stopped; no request can be served (HTTP 503)."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class PromptTooLongError(EngineError, ValueError):
    """Prompt plus requested output does not fit max_model_len (HTTP 400, param names the field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class RequestFailedError(EngineError):
    """This one request failed inside a step (e.g. bad logits); others keep running (HTTP 500)."""
