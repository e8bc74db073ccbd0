"""Model access for stages: ledger-backed request cache + per-stage usage/progress accounting.

Cache key = sha256(model id, rendered messages with image *hashes*, output schema, generation
params). The parser is not part of the key: a cached answer is re-parsed on every hit, so a parser
fix re-parses without re-asking."""

from __future__ import annotations

import asyncio
import hashlib
import json
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from rmskit.ledger import Ledger
from rmskit.models.base import (
    AuthenticationError,
    BackendError,
    ErrorKind,
    GenParams,
    Message,
    ModelBackend,
    Result,
    Usage,
)
from rmskit.models.structured import parse_structured
from rmskit.pipeline.progress import Stats


@lru_cache(maxsize=64)
def _schema_json(schema: type[BaseModel]) -> str:
    return json.dumps(schema.model_json_schema(), sort_keys=True, separators=(",", ":"))


def cache_key(
    model_id: str, messages: list[Message], schema: type[BaseModel] | None, params: GenParams
) -> str:
    payload = {
        "model": model_id,
        "messages": [[m.role, m.content, [i.sha256 for i in m.images]] for m in messages],
        "schema": _schema_json(schema) if schema else None,
        "params": params.model_dump(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_cached(text: str, schema: type[BaseModel]) -> dict[str, Any] | None:
    """Re-parse a cached answer with today's parser; None when it no longer validates."""
    return parse_structured(text, schema).parsed


class StageFailed(Exception):
    """A stage could not produce a usable output for one item (reason recorded in the ledger).

    `transient`: the transport or server failed (connection, timeout, 5xx, 429 after retries), not
    the item: the item stays pending and a re-run retries it. Otherwise the failure is final."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RepeatedRequest(StageFailed):
    """A rewrite round would send exactly the request of an earlier round of the same sample: the
    prompt ignores the feedback, so asking again can only return the same failing answer."""


class Caller:
    """One per backend configuration; shared by every image in flight."""

    def __init__(self, backend: ModelBackend, ledger: Ledger, stats: Stats, params: GenParams) -> None:
        self.backend = backend
        self.ledger = ledger
        self.stats = stats
        self.params = params
        # Identical requests in flight at once share one call (e.g. the same query checked twice).
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def vision(self) -> bool:
        return self.backend.capabilities.vision

    async def ask(
        self,
        stage: str,
        messages: list[Message],
        schema: type[BaseModel],
        *,
        image_sha: str | None,
        key: str,
        max_tokens: int | None = None,
        distinct: set[str] | None = None,
    ) -> dict[str, Any]:
        """Return the parsed output (a dict valid under `schema`), from the cache when possible.

        `max_tokens` lowers the backend's cap for this request. `distinct` holds the request keys
        of this sample's earlier rounds: a request equal to one of them raises RepeatedRequest
        (the invariant that no two rounds of a sample send an identical request)."""
        params = self.params
        if max_tokens is not None and max_tokens < params.max_tokens:
            params = params.model_copy(update={"max_tokens": max_tokens})
        ckey = cache_key(self.backend.model_id, messages, schema, params)
        if distinct is not None:
            if ckey in distinct:
                raise RepeatedRequest(f"{stage}: this round would repeat an earlier round's request")
            distinct.add(ckey)
        pending = self._pending.get(ckey)
        if pending is not None:
            self.stats.cached(stage)
            return await asyncio.shield(pending)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ckey] = future
        try:
            parsed = await self._ask(stage, messages, schema, params, ckey, image_sha=image_sha, key=key)
        except BaseException as exc:
            if not future.done():
                future.set_exception(
                    exc if isinstance(exc, Exception) else StageFailed(f"{stage}: cancelled")
                )
                future.exception()  # mark retrieved: waiters may not exist
            raise
        finally:
            self._pending.pop(ckey, None)
        future.set_result(parsed)
        return parsed

    async def _ask(
        self,
        stage: str,
        messages: list[Message],
        schema: type[BaseModel],
        params: GenParams,
        ckey: str,
        *,
        image_sha: str | None,
        key: str,
    ) -> dict[str, Any]:
        hit = self.ledger.cache_get(ckey)
        if hit is not None:
            parsed = parse_cached(hit["text"], schema)
            if parsed is not None:
                self.stats.cached(stage)
                return parsed
            self.ledger.cache_delete(ckey)  # no longer parses: ask again
        self.stats.start(stage)
        try:
            result: Result = await self.backend.generate(messages, schema=schema, params=params)
        except BackendError as exc:
            self.stats.finish(stage, ok=False)
            self.ledger.add_failure(image_sha, stage, key, exc.kind.value, str(exc))
            if isinstance(exc, AuthenticationError):  # no later request can succeed: stop the run
                raise
            raise StageFailed(f"{stage}: {exc}", transient=exc.transient) from exc
        except Exception as exc:  # a backend bug must not kill the run; record it per item
            self.stats.finish(stage, ok=False)
            self.ledger.add_failure(image_sha, stage, key, ErrorKind.other.value, repr(exc))
            raise StageFailed(f"{stage}: unexpected {type(exc).__name__}: {exc}") from exc
        if result.adjustments:  # schema parity: caps enforced by truncation are recorded, not failed
            self.ledger.add_failure(image_sha, stage, key, "adjusted", "; ".join(result.adjustments))
        usage = result.usage or Usage()
        self.stats.finish(stage, ok=True, tokens=usage.total)
        parsed = result.parsed
        if parsed is None:
            parsed = parse_cached(result.text, schema)
        if parsed is None:
            self.ledger.add_failure(
                image_sha, stage, key, ErrorKind.parse.value, "output does not match schema"
            )
            raise StageFailed(f"{stage}: model output does not match the {schema.__name__} schema")
        self.ledger.cache_put(
            ckey,
            model=self.backend.model_id,
            stage=stage,
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
        return parsed

    def bind(self, image_sha: str | None, key: str, distinct: set[str] | None = None) -> BoundCaller:
        """This caller as a StageCaller for one item (failures are recorded against it)."""
        return BoundCaller(self, image_sha, key, distinct)


class BoundCaller:
    """A ledger-backed Caller bound to one item: what the plain stage functions receive."""

    def __init__(self, caller: Caller, image_sha: str | None, key: str, distinct: set[str] | None) -> None:
        self.caller = caller
        self.image_sha = image_sha
        self.key = key
        self.distinct = distinct
        self.model_id = caller.model_id
        self.vision = caller.vision

    async def ask(
        self, stage: str, messages: list[Message], schema: type[BaseModel], max_tokens: int | None = None
    ) -> dict[str, Any]:
        return await self.caller.ask(
            stage,
            messages,
            schema,
            image_sha=self.image_sha,
            key=self.key,
            max_tokens=max_tokens,
            distinct=self.distinct,
        )


class DirectCaller:
    """A StageCaller straight on a backend: no ledger, no cache (notebooks, one-off checks)."""

    def __init__(self, backend: ModelBackend, params: GenParams | None = None) -> None:
        self.backend = backend
        self.params = params or GenParams()
        self.model_id = backend.model_id
        self.vision = backend.capabilities.vision

    async def ask(
        self, stage: str, messages: list[Message], schema: type[BaseModel], max_tokens: int | None = None
    ) -> dict[str, Any]:
        params = self.params
        if max_tokens is not None and max_tokens < params.max_tokens:
            params = params.model_copy(update={"max_tokens": max_tokens})
        try:
            result = await self.backend.generate(messages, schema=schema, params=params)
        except BackendError as exc:
            raise StageFailed(f"{stage}: {exc}", transient=exc.transient) from exc
        parsed = result.parsed if result.parsed is not None else parse_cached(result.text, schema)
        if parsed is None:
            raise StageFailed(f"{stage}: model output does not match the {schema.__name__} schema")
        return parsed
