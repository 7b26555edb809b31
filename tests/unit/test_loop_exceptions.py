"""The event loop's exception handler: a client that leaves during a TLS write is one
debug line; every other error still reaches the default handler with its traceback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy_app.app import quiet_tls_disconnects


class Loop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.defaults: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.defaults.append(context)


@pytest.fixture
def loop() -> Any:
    loop = Loop()
    yield loop
    loop.close()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("unable to perform operation on <TCPTransport>; the handler is closed"),
        ConnectionResetError("Connection reset by peer"),
        BrokenPipeError(),
    ],
)
def test_a_client_leaving_during_a_tls_write_is_quiet(loop: Loop, error: Exception) -> None:
    quiet_tls_disconnects(loop, {"message": "Fatal error on SSL protocol", "exception": error})
    assert loop.defaults == []


@pytest.mark.parametrize(
    "context",
    [
        {"message": "Fatal error on SSL protocol", "exception": RuntimeError("something else")},
        {"message": "Fatal error on SSL protocol", "exception": ValueError("bad")},
        {"message": "Task exception was never retrieved", "exception": ConnectionResetError()},
        {"message": "Fatal error on SSL protocol"},
    ],
)
def test_anything_else_reaches_the_default_handler(loop: Loop, context: dict[str, Any]) -> None:
    quiet_tls_disconnects(loop, context)
    assert loop.defaults == [context]
