"""Errors of the gateway, and the one place that turns them into OpenAI-style JSON.

    GatewayError                 status  type
    ├── AuthenticationFailed     401     invalid_request_error (code invalid_api_key)
    ├── PermissionDenied         403     invalid_request_error (an admin route without the admin key)
    ├── NotFound                 404     invalid_request_error (code model_not_found, turn_not_found…)
    ├── Conflict                 409     invalid_request_error
    ├── InvalidRequest           400     invalid_request_error
    ├── PayloadTooLarge          413     invalid_request_error
    ├── UnsupportedMediaType     415     invalid_request_error (a body that is not application/json)
    ├── RateLimited              429     rate_limit_error (code rate_limit_exceeded; Retry-After)
    ├── EngineUnavailable        502     api_error: the engine failed or is unreachable
    ├── AuthenticationUnavailable 503    api_error: the store that holds the keys is unreachable
    ├── StoreUnavailable         503     api_error: a route that reads the store cannot reach it
    └── EngineTimeout            504     api_error

Domain errors never subclass HTTPException; the handlers below are the only translation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nextturn.errors import NextturnError, StoreError

log = logging.getLogger(__name__)


class GatewayError(NextturnError):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class AuthenticationFailed(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class PermissionDenied(GatewayError):
    status, type = 403, "invalid_request_error"


class NotFound(GatewayError):
    status, type = 404, "invalid_request_error"


class Conflict(GatewayError):
    status, type = 409, "invalid_request_error"


class InvalidRequest(GatewayError):
    status, type = 400, "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status, type = 413, "invalid_request_error"


class UnsupportedMediaType(GatewayError):
    status, type = 415, "invalid_request_error"


class RateLimited(GatewayError):
    """A tenant over its share: the response says when to try again (``Retry-After``, whole seconds)."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class EngineUnavailable(GatewayError):
    status, type = 502, "api_error"


class AuthenticationUnavailable(GatewayError):
    status, type = 503, "api_error"


class StoreUnavailable(GatewayError):
    status, type = 503, "api_error"


class EngineTimeout(GatewayError):
    status, type = 504, "api_error"


def error_headers(error: GatewayError) -> list[tuple[str, str]]:
    """What an error's response says besides its body: how to authenticate, when to come back."""
    if error.status == 401:
        return [("WWW-Authenticate", "Bearer")]
    if isinstance(error, RateLimited):
        return [("Retry-After", str(error.retry_after_s))]
    return []


def error_body(error: GatewayError) -> dict[str, object]:
    return {"error": {"message": str(error), "type": error.type, "param": error.param, "code": error.code}}


def invalid_body(errors: Sequence[Any]) -> InvalidRequest:
    """The 400 for a request body that pydantic refused: its first error, located."""
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    if first["type"] == "json_invalid":
        return InvalidRequest("the request body is not valid JSON")
    return InvalidRequest(f"{where or 'body'}: {first['msg']}", param=where or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.status, headers=dict(error_headers(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(invalid_body(exc.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown routes, wrong methods
        error = GatewayError(str(exc.detail))
        error.status, error.type = exc.status_code, "invalid_request_error"
        return JSONResponse(error_body(error), status_code=exc.status_code)

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        error = StoreUnavailable(f"the store is unavailable; try again: {exc}")
        return JSONResponse(error_body(error), status_code=error.status)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body(GatewayError("internal error; it has been logged")), status_code=500)
