"""Every failure a client can see, mapped to OpenAI error JSON in this one place.

Body shape: {"error": {"message", "type", "param", "code"}}. Validation errors (pydantic), HTTP errors
(unknown route, bad body), typed engine errors and generation failures all become an `OpenAIError` here.
Never put a traceback or an exception's repr into a response body: unexpected exceptions are logged and
answered with a generic 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fusedserve.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    PromptTooLongError,
    RequestFailedError,
)

logger = logging.getLogger("fusedserve.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class OpenAIError(Exception):
    """An error response: HTTP status, the OpenAI error fields, optional headers (Retry-After)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status_code, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unauthorized() -> OpenAIError:
    return OpenAIError(401, "Incorrect or missing API key.", code="invalid_api_key")


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")


def request_timeout(seconds: float) -> OpenAIError:
    return OpenAIError(408, f"Request did not finish within {seconds:g} seconds.", code="request_timeout")


def generation_failed(detail: str | None) -> OpenAIError:
    """A request that failed inside the engine (RequestFailedError semantics); others keep running."""
    reason = f": {detail}" if detail else ""
    return OpenAIError(500, f"Generation failed{reason}", code="generation_failed")


def generation_aborted() -> OpenAIError:
    return OpenAIError(503, "The server aborted this request (it is shutting down).", code="request_aborted")


def internal_error() -> OpenAIError:
    return OpenAIError(500, "Internal server error.", code="internal_error")


def from_engine_error(exc: EngineError) -> OpenAIError:
    """The one mapping from the engine's typed errors to HTTP."""
    if isinstance(exc, PromptTooLongError):
        return bad_request(str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, EngineOverloadedError):
        retry_after = str(max(1, math.ceil(exc.retry_after_seconds)))
        return OpenAIError(429, str(exc), code="engine_overloaded", headers={"Retry-After": retry_after})
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, f"The engine is not running: {exc}", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return generation_failed(str(exc))
    return OpenAIError(500, f"Engine error: {exc}", code="engine_error")


# --- pydantic validation errors -----------------------------------------------------------------------------

# Pydantic puts union-member and validator tags ("str", "list[int]", "function-after[...]") into error
# locations; they are not part of the field path a client wrote.
_LOC_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _is_field_step(step: str | int) -> bool:
    if isinstance(step, int):
        return True
    return step not in _LOC_TAGS and not any(ch in step for ch in "[]()-'\" ")


def param_path(loc: Sequence[str | int]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    steps = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    path = ""
    for step in steps:
        if not _is_field_step(step):
            continue
        path += f"[{step}]" if isinstance(step, int) else (f".{step}" if path else step)
    return path or None


def _error_message(error: dict[str, Any]) -> str:
    if error.get("type") == "extra_forbidden":
        return "Unrecognized request argument supplied"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def from_validation_errors(errors: Sequence[Any]) -> OpenAIError:
    """The first failing field becomes `param`; messages of all errors at that field are joined."""
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"Request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    param = param_path(first.get("loc", ()))
    if param is None and first.get("type") == "missing":
        return bad_request("Request body is required: a JSON object.", code="missing_body")
    messages: list[str] = []
    for error in errors:
        if param_path(error.get("loc", ())) == param:
            message = _error_message(error)
            if message not in messages:
                messages.append(message)
    text = " or ".join(messages)
    return bad_request(f"{param}: {text}" if param else text, param=param, code="invalid_value")


# --- handlers -----------------------------------------------------------------------------------------------


async def _openai_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return exc.response()


async def _request_validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return from_validation_errors(exc.errors()).response()


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        error = OpenAIError(404, f"Route {request.method} {request.url.path} not found.", code="not_found")
    elif exc.status_code == 405:
        message = f"Method {request.method} not allowed on {request.url.path}."
        error = OpenAIError(405, message, code="not_allowed")
    elif exc.status_code == 400:  # a body FastAPI could not decode (e.g. not UTF-8)
        error = bad_request(f"Request body could not be read: {exc.detail}", code="invalid_body")
    else:
        error = OpenAIError(exc.status_code, str(exc.detail))
    error.headers.update(exc.headers or {})
    return error.response()


async def _engine_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return from_engine_error(exc).response()


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error_handler)
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
    app.add_exception_handler(ValidationError, _request_validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(EngineError, _engine_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
