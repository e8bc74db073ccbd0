"""`get_model(spec)` handles: one model, usable from plain scripts (sync) and from async code.

Backends bind their HTTP sessions and batch workers to the event loop they first run on, so the
handle keeps one backend per loop: sync calls run on a private loop in a daemon thread; async calls
use a backend made on the caller's loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from rmskit.config import BackendConfig
from rmskit.models.base import GenParams, Message, ModelBackend, Result

MessagesLike = str | Message | dict[str, Any] | Sequence[Message | dict[str, Any]]


def as_messages(messages: MessagesLike) -> list[Message]:
    """A prompt string, one message, or a list of Message/dicts -> list[Message]."""
    if isinstance(messages, str):
        return [Message(role="user", content=messages)]
    if isinstance(messages, (Message, dict)):
        messages = [messages]
    return [m if isinstance(m, Message) else Message.model_validate(m) for m in messages]


class ModelHandle:
    def __init__(self, cfg: BackendConfig) -> None:
        self.cfg = cfg
        self.spec = cfg.spec
        self._backends: dict[int, tuple[asyncio.AbstractEventLoop, ModelBackend]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ModelHandle({self.spec!r})"

    def _backend_here(self) -> ModelBackend:
        from rmskit.models import load_backend

        loop = asyncio.get_running_loop()
        got = self._backends.get(id(loop))
        if got is None or got[0] is not loop:
            got = (loop, load_backend(self.cfg))
            self._backends[id(loop)] = got
        return got[1]

    async def agenerate(
        self,
        messages: MessagesLike,
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        """Async generate on the running loop."""
        return await self._backend_here().generate(as_messages(messages), schema=schema, params=params)

    def generate(
        self,
        messages: MessagesLike,
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        """Blocking generate (from code that is not inside an event loop)."""
        fut = asyncio.run_coroutine_threadsafe(
            self.agenerate(messages, schema=schema, params=params), self._private_loop()
        )
        return fut.result()

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="rmskit-model", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    async def aclose(self) -> None:
        """Close the backends made on this loop (and the private loop's, when called from sync code)."""
        here = asyncio.get_running_loop()
        for key, (loop, backend) in list(self._backends.items()):
            if loop is here:
                await backend.aclose()
                del self._backends[key]

    def close(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop = None

    def __enter__(self) -> ModelHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
