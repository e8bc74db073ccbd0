"""Test helpers shipped with rmskit: an OpenAI-compatible HTTP test server with fault injection
(`rmskit.testing.openai_server`, also runnable with `python -m rmskit.testing.openai_server`).

Names are resolved lazily so that running the server module with `-m` does not import it twice."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmskit.testing.openai_server import (
        OpenAITestServer,
        Reply,
        RequestRecord,
        ServerStats,
        instance_from_schema,
    )

__all__ = ["OpenAITestServer", "Reply", "RequestRecord", "ServerStats", "instance_from_schema"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rmskit.testing import openai_server

        return getattr(openai_server, name)
    raise AttributeError(f"module 'rmskit.testing' has no attribute {name!r}")
