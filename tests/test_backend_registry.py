"""The backend registry: spec validation, entry-point plugins, `models list` from the registry,
get_model handles, and the testing extra's pytest fixtures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from rmskit.config import BackendConfig
from rmskit.models import get_model, load_backend, registry
from rmskit.models.base import GenParams, Message
from rmskit.models.remote import RemoteBackend, Reply
from rmskit.testing.openai_server import OpenAITestServer

BAD_SPECS = ["garbage", "foo:bar", ":::", "embedded:xyz", "hf:", "/etc/passwd", "openai:", "hf:a b"]


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_unknown_specs_are_refused_listing_the_valid_forms(spec: str) -> None:
    with pytest.raises(ValidationError) as ei:
        BackendConfig(spec=spec)
    msg = str(ei.value)
    assert "valid forms: openai:MODEL" in msg and "embedded" in msg


def test_valid_specs_resolve_to_their_kind(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cases = {
        "openai:gpt-4o": ("openai", "gpt-4o"),
        "hf:Qwen/Qwen2-VL-2B-Instruct": ("hf", "Qwen/Qwen2-VL-2B-Instruct"),
        "vllm:Qwen/Qwen2-VL-2B-Instruct": ("vllm", "Qwen/Qwen2-VL-2B-Instruct"),
        "embedded": ("embedded", "embedded"),
        str(tmp_path / "m"): ("hf", str(tmp_path / "m")),
    }
    for spec, (kind, name) in cases.items():
        c = BackendConfig(spec=spec)
        assert (c.kind, c.name) == (kind, name)


def _app() -> Any:
    from rmskit.cli import app

    return app


def test_build_cli_exits_2_on_a_bad_spec_and_on_missing_vllm(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    res = CliRunner().invoke(
        _app(), ["build", str(tmp_path / "p"), "--model", "garbage", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "valid forms" in res.output
    if registry.get_kind("vllm").missing() is None:
        pytest.skip("vllm is installed here")
    with pytest.raises(registry.BackendUnavailable, match="pip install vllm"):
        load_backend(BackendConfig(spec="vllm:Qwen/Qwen2-VL-2B-Instruct"))
    (tmp_path / "p" / "a.jpg").write_bytes(b"not really")
    args = [
        "build",
        str(tmp_path / "p"),
        "--model",
        "vllm:Qwen/Qwen2-VL-2B-Instruct",
        "--out",
        str(tmp_path / "r"),
    ]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 2 and "pip install vllm" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------ a plugin: one thin remote backend


class EchoBackend(RemoteBackend):
    """A whole remote backend: only the wire format. Answers with the last user message as JSON."""

    where = "echo://local"

    async def _send(self, payload: dict[str, Any]) -> bytes:
        return json.dumps({"text": payload["messages"][-1]["content"]}).encode()

    def _classify(self, e: BaseException) -> Any:
        raise e

    async def _render(self, messages: list[Message]) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content} for m in messages]

    def _payload(self, params: GenParams, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"messages": messages}

    def _parse_reply(self, body: bytes) -> Reply:
        return Reply(json.loads(body)["text"], prompt_tokens=3, completion_tokens=2)


def make_echo_kind() -> registry.BackendKind:
    return registry.BackendKind(
        name="echo",
        factory=f"{__name__}:EchoBackend",
        forms=("echo:NAME",),
        vision="no",
        structured="prompt",
        local=True,
        remote=True,
        prefix="echo",
    )


@pytest.fixture
def echo_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="echo", value=f"{__name__}:make_echo_kind", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == ep.group else [])
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    yield
    registry.unregister("echo")


class Answer(BaseModel):
    word: str


def test_entry_point_plugin_adds_a_kind_to_specs_models_list_and_get_model(echo_plugin: None) -> None:
    c = BackendConfig(spec="echo:any")
    assert (c.kind, c.name) == ("echo", "any")
    res = CliRunner().invoke(_app(), ["models", "list", "--json"])
    kinds = {k["kind"]: k for k in json.loads(res.output)["kinds"]}
    assert set(kinds) >= {"openai", "hf", "vllm", "embedded", "echo"} and kinds["echo"]["spec"] == "echo:NAME"
    with get_model("echo:any", structured="prompt") as model:
        out = model.generate('{"word": "hi"}', schema=Answer)  # sync
        assert out.parsed == {"word": "hi"} and out.usage.total == 5

        async def go() -> Any:
            try:
                return await model.agenerate([{"role": "user", "content": '{"word": "yo"}'}], schema=Answer)
            finally:
                await model.aclose()

        assert asyncio.run(go()).parsed == {"word": "yo"}


def test_get_model_against_the_test_server_sync_and_async() -> None:
    with OpenAITestServer(responder=lambda body: {"word": "kettle"}) as srv:
        with get_model("openai:test-model", base_url=srv.base_url) as model:
            assert model.generate("one word", schema=Answer).parsed == {"word": "kettle"}
        assert len(srv.chat_records()) == 1


def test_testing_extra_pytest_plugin_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "def test_x(openai_server, rmskit_backend_config):\n"
        "    assert rmskit_backend_config.base_url == openai_server.base_url\n"
        "    assert openai_server.base_url.startswith('http://127.0.0.1:')\n"
    )
    installed = any(ep.value == "rmskit.testing.pytest_plugin" for ep in entry_points(group="pytest11"))
    args = [] if installed else ["-p", "rmskit.testing.pytest_plugin"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_x.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr


def test_models_list_with_a_server_shows_the_probed_capabilities() -> None:
    with OpenAITestServer(personality="llama-server") as srv:
        res = CliRunner().invoke(
            _app(), ["models", "list", "--json", "--model", "openai:test-model", "--base-url", srv.base_url]
        )
    model = json.loads(res.output)["model"]
    assert (
        model["capabilities"]["vision"] is False and model["capabilities"]["structured_mode"] == "json_schema"
    )
    assert "image input is not supported" in model["note"]
