"""The one model-backend Protocol every stage talks to, and the types at its boundary."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field


class ImageInput(BaseModel):
    """An image attached to a message. Backends load and encode it themselves; the sha256 is what
    enters cache keys, so re-encoding settings never change a sample's identity."""

    sha256: str
    path: Path


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str
    images: list[ImageInput] = Field(default_factory=list)


class GenParams(BaseModel):
    """Generation parameters that change outputs (all of them enter the cache key)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Result(BaseModel):
    text: str
    parsed: dict[str, Any] | None = None
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str | None = None
    model: str = ""
    attempts: int = 1
    # Constraints the server could not be told (a strict schema drops maxLength/maxItems) and that
    # were enforced leniently by truncation, e.g. ["category: truncated 61 -> 60 chars"]. Callers
    # record them with the sample; a cap alone never fails an item.
    adjustments: list[str] = Field(default_factory=list)


class Capabilities(BaseModel):
    vision: bool = False
    structured: Literal["native", "grammar", "prompt"] = "prompt"
    max_images: int = 1
    local: bool = False
    # How structured output is requested from a remote server, as probed or forced:
    # json_schema | json_object_schema (llama.cpp's extension) | json_object | prompt.
    structured_mode: str | None = None


class ErrorKind(StrEnum):
    rate_limit = "rate_limit"
    server = "server"
    timeout = "timeout"
    connection = "connection"
    bad_request = "bad_request"
    auth = "auth"
    parse = "parse"
    image = "image"
    format_refused = "format_refused"  # the server refused the structured-output mode
    too_large = "too_large"  # response body over the configured cap
    other = "other"


# Failures of the transport or the server, not of the item: the item stays pending and a re-run
# retries it. Everything else (bad request, unparsable output after re-asks, a bad image) is final.
TRANSIENT_KINDS = frozenset({ErrorKind.rate_limit, ErrorKind.server, ErrorKind.timeout, ErrorKind.connection})


class BackendError(Exception):
    """A per-request failure, already retried as far as the backend's policy allows.

    The runner records `kind` and `str(self)` against the item in the ledger and moves on."""

    def __init__(self, kind: ErrorKind, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.retriable = retriable

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.args[0]}"

    @property
    def transient(self) -> bool:
        """True when the item should stay pending for a re-run (see TRANSIENT_KINDS)."""
        return self.kind in TRANSIENT_KINDS


class AuthenticationError(BackendError):
    """401/403: no later request can succeed, so the run stops at once. The message names the
    endpoint, never the key."""

    def __init__(self, where: str, status: int | None = None) -> None:
        detail = f" (HTTP {status})" if status else ""
        super().__init__(
            ErrorKind.auth, f"authentication failed at {where}{detail}: check the API key variable"
        )


@runtime_checkable
class ModelBackend(Protocol):
    """`generate` returns text, the parsed object (validated against `schema` when given), usage
    and finish reason; it raises BackendError when the request cannot be completed."""

    model_id: str
    capabilities: Capabilities

    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result: ...

    async def aclose(self) -> None: ...
