"""pytest fixtures for code that talks to rmskit backends (installed with `rmskit[testing]`, loaded
through the `pytest11` entry point):

- `openai_server`: a running OpenAI-compatible test server (rmskit.testing.openai_server), stopped
  after the test; `openai_server_factory(**kw)` makes more, with any personality or faults;
- `scripted_openai_server`: one that answers rmskit's stage prompts (rms_script);
- `rmskit_backend_config`: a BackendConfig pointing at `openai_server`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rmskit.testing.openai_server import OpenAITestServer


@pytest.fixture
def openai_server_factory() -> Iterator[Callable[..., OpenAITestServer]]:
    started: list[OpenAITestServer] = []

    def make(**kw: Any) -> OpenAITestServer:
        srv = OpenAITestServer(**kw).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def openai_server(openai_server_factory: Callable[..., OpenAITestServer]) -> OpenAITestServer:
    return openai_server_factory(keep_bodies=True)


@pytest.fixture
def scripted_openai_server(openai_server_factory: Callable[..., OpenAITestServer]) -> OpenAITestServer:
    from rmskit.testing.rms_script import responder

    return openai_server_factory(responder=responder)


@pytest.fixture
def rmskit_backend_config(openai_server: OpenAITestServer) -> Any:
    from rmskit.config import BackendConfig

    return BackendConfig(spec="openai:test-model", base_url=openai_server.base_url, backoff_base_s=0.01)
