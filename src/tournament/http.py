"""What both HTTP services share: bearer-token guard, body size limit, clear 422s."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from tournament.contracts import MAX_BODY_BYTES

__all__ = ["MAX_WAIT", "BodyTooLarge", "Guard", "Unprocessable", "install_error_handlers"]

#: The longest wait a long-polling request may ask for (seconds), on either engine.
MAX_WAIT = 30.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_WRITES = ("POST", "PUT", "PATCH", "DELETE")


class Unprocessable(Exception):
    """A request refused with 422 in the shape of every other 422: ``detail`` the
    messages joined by "; ", ``errors`` the list."""

    def __init__(self, *messages: str) -> None:
        super().__init__("; ".join(messages))
        self.messages = list(messages)


class BodyTooLarge(HTTPException):
    """The streamed request body passed the limit (answered with 413)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


async def _respond(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware run before any route: writes need ``Authorization: Bearer TOKEN``
    (401 otherwise), and a body over ``limit`` bytes is refused with 413 — by its
    Content-Length at once, or while it streams in when the length is not declared.
    A write that no route of ``routes`` takes goes on without a token, so an unknown
    path still gets 404 and a wrong method 405: only what exists is guarded."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        routes: list[BaseRoute],
        limit: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.token = token
        self.routes = routes
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"]:
            # No id holds a NUL (and PostgreSQL cannot look one up): nothing is there.
            await _respond(send, 404, "no such resource: the path holds a NUL character", {})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (
            scope["method"] in _WRITES
            and not self._authorised(headers.get("authorization"))
            and self._routed(scope)
        ):
            await _respond(
                send,
                401,
                "missing or wrong API token: send the header 'Authorization: Bearer <token>' "
                "(accord up / accord demo print where the token file is)",
                {"www-authenticate": "Bearer"},
            )
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _respond(send, 413, self._too_large(int(declared)), {})
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self._too_large(seen))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _respond(send, 413, self._too_large(seen), {})

    def _too_large(self, size: int) -> str:
        return (
            f"request body too large: {size} bytes or more, the limit is {self.limit} bytes "
            f"({self.limit // 1024} KiB)"
        )

    def _routed(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] == Match.FULL for route in self.routes)

    def _authorised(self, header: str | None) -> bool:
        if not header or not self.token:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            value.strip().encode(), self.token.encode()
        )


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) if parts else "body"


def _message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', msg)})"
    if error.get("type") == "missing":
        return f"{_location(tuple(error.get('loc', ())))}: this field is required"
    if error.get("type") == "extra_forbidden":
        return f"{_location(tuple(error.get('loc', ())))}: unknown field (not allowed)"
    return f"{_location(tuple(error.get('loc', ())))}: {msg}"


def _unprocessable(messages: list[str]) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": "; ".join(messages) or "invalid request", "errors": messages},
    )


def _unreadable(cause: BaseException) -> str | None:
    """What is wrong with a JSON body that FastAPI could not parse for ``cause``."""
    if isinstance(cause, UnicodeDecodeError):
        byte = cause.object[cause.start]
        return (
            f"the body is not valid JSON (it is not UTF-8: byte 0x{byte:02x} at position "
            f"{cause.start} cannot be decoded; send text encoded in UTF-8)"
        )
    if isinstance(cause, RecursionError):
        return (
            "the body is not readable JSON (its arrays or objects nest too deeply; "
            "no request of this API nests more than two levels)"
        )
    return None


def install_error_handlers(app: FastAPI) -> None:
    """422 responses with ``detail`` a readable sentence and ``errors`` the list, also
    for a body FastAPI cannot even parse (not UTF-8, nested too deeply) and for
    :class:`Unprocessable` raised by an endpoint."""

    @app.exception_handler(Unprocessable)
    async def refused(_request: Request, exc: Unprocessable) -> JSONResponse:
        return _unprocessable(exc.messages)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        # FastAPI answers 400 "There was an error parsing the body" for what the JSON
        # parser raises besides JSONDecodeError, with that error as the cause.
        unreadable = _unreadable(exc.__cause__) if exc.__cause__ is not None else None
        if exc.status_code == 400 and unreadable is not None:
            return _unprocessable([unreadable])
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [_message(dict(e)) for e in exc.errors()]
        content_type = request.headers.get("content-type", "")
        if request.method in _WRITES and content_type and "json" not in content_type.lower():
            # `curl -d '{...}'` sends JSON labelled as a form: FastAPI then reads no
            # object at all. Say what to change rather than that it is not an object.
            messages = [
                f"the body must be sent as JSON with 'Content-Type: application/json', "
                f"not {content_type.split(';')[0]!r}"
            ]
        return _unprocessable(messages)
