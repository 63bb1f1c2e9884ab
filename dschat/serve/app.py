"""The ASGI application: the three shapes' routes, the API key, the body limit, and errors in each shape.

Every route answers errors with its shape's JSON (errors.py), an unknown path too; an exception nobody
expected is one line in the server's log and a 500 with one line for the client, and the server keeps serving.
"""

from __future__ import annotations

import functools
import hmac

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from dschat.serve import llamacpp_api, native, ollama_api, openai_api
from dschat.serve.common import State, failure
from dschat.serve.errors import ApiError, response

OPEN_PATHS = ("/health",)  # answered without the API key (a liveness probe)


class Guard:
    """Pure ASGI: the API key (Authorization: Bearer K) before anything else, then the body limit: a declared
    Content-Length over it is refused before a byte is read, and a body that grows over it while read."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.state.api_key
        if key and path not in OPEN_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip().encode() if given[:7].lower() == "bearer " else b""
            # the key, or the token of this run that the discovery file gives a local dschat (discovery.py)
            known = [key.encode()] + ([self.state.run_token.encode()] if self.state.run_token else [])
            if not any([hmac.compare_digest(token, k) for k in known]):
                e = ApiError(401, "a wrong or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
                return await response(path, e)(scope, receive, send)
        limit = self.state.limits.max_body
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            e = ApiError(413, f"the request body ({declared} bytes) is over this server's limit of {limit} bytes "
                              "(dschat serve --max-body)", code="request_too_large", headers={"Connection": "close"})
            return await response(path, e)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, f"the request body is over this server's limit of {limit} bytes "
                                        "(dschat serve --max-body)", code="request_too_large")
            return message

        await self.app(scope, counted, send)


def endpoint(fn):
    """A route whose unexpected exceptions become a 500 in its shape (ApiError passes through)."""
    @functools.wraps(fn)
    async def wrapped(request):
        try:
            return await fn(request)
        except ApiError:
            raise
        except Exception as e:
            raise failure(e) from None
    return wrapped


async def api_error(request, e: ApiError):
    return response(request.url.path, e)


async def http_error(request, e: HTTPException):
    text = {404: f"no such endpoint: {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    return response(request.url.path, ApiError(e.status_code, text, code="not_found" if e.status_code == 404 else None))


def build_app(state: State, cors_origins: list[str] | None = None) -> Starlette:
    routes = [Route(path, endpoint(fn), methods=methods)
              for path, fn, methods in openai_api.ROUTES + llamacpp_api.ROUTES + ollama_api.ROUTES + native.ROUTES]
    middleware = [Middleware(Guard, state=state)]
    if cors_origins:  # off unless asked for (dschat serve --cors-origin)
        from starlette.middleware.cors import CORSMiddleware

        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: api_error, HTTPException: http_error})
    app.state.dschat = state
    return app
