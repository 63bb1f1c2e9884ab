"""Errors as each API shape writes them. The shape is the path's: /v1/... (and dschat's own /dschat/...) OpenAI's
{"error": {"message", "type", "param", "code"}}, /api/... ollama's {"error": "..."}, the rest llama.cpp
server's {"error": {"code", "message", "type"}}. Never a traceback."""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         500: "server_error", 503: "unavailable_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def from_validation(e: ValidationError) -> ApiError:
    """A pydantic error as one readable line naming the field (422)."""
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    return ApiError(422, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value")


def shape_of(path: str) -> str:
    if path.startswith(("/v1/", "/dschat/")) or path == "/v1":
        return "openai"
    if path.startswith("/api/") or path == "/api":
        return "ollama"
    return "llamacpp"


def body(shape: str, e: ApiError) -> dict:
    if shape == "openai":
        kind = "invalid_request_error" if e.status in (400, 401, 404, 405, 413, 422) else TYPES.get(e.status, "server_error")
        return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    if shape == "ollama":
        return {"error": e.message}
    return {"error": {"code": e.status, "message": e.message, "type": TYPES.get(e.status, "server_error")}}


def response(path: str, e: ApiError) -> JSONResponse:
    return JSONResponse(body(shape_of(path), e), status_code=e.status, headers=e.headers)


def stream_line(shape: str, e: ApiError) -> dict:
    """The error as the last event of a stream that has begun (its status line is already sent)."""
    return body(shape, e)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
