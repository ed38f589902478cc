"""Every error leaves the gateway as application/problem+json (RFC 9457) with a stable `code`."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.metrics import HTTP_ERRORS
from shared.core.errors import XrayqError
from shared.schemas import Problem

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)

# For the OpenAPI document: which error statuses a route may answer, and their body.
PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM_JSON: {}}}
    for status in (400, 401, 403, 404, 409, 413, 415, 421, 422, 429)
}

_CODE_FOR_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
}


def problem_response(
    status: int, code: str, detail: str | None, instance: str | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://xrayq.dev/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "code": code,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    HTTP_ERRORS.labels(code, str(status)).inc()
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def error_response(error: XrayqError, instance: str | None) -> JSONResponse:
    """An error value as its problem, with the headers its status calls for."""
    response = problem_response(error.http_status, error.code, error.detail, instance, **error.extra)
    if error.http_status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="xrayq"'
    if "retry_after_s" in error.extra:
        response.headers["Retry-After"] = str(error.extra["retry_after_s"])
    return response


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(XrayqError)
    async def _xrayq_error(request: Request, exc: XrayqError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(part) for part in err.get("loc", ())], "msg": err.get("msg"), "type": err.get("type")}
            for err in exc.errors()
        ]
        # No body at all, or no file part; another missing form field is an invalid request.
        missing_file = any(
            e["type"] == "missing" and e["loc"] in (["body"], ["body", "file"], ["body", "files"]) for e in errors
        )
        code = "missing_file" if missing_file else "invalid_request"
        status = 400 if missing_file else 422
        return problem_response(status, code, "The request is not valid.", request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODE_FOR_STATUS.get(exc.status_code, "http_error")
        return problem_response(exc.status_code, code, str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal_error", "An unexpected error occurred.", request.url.path)
