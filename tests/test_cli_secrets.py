"""Credentials written into --base-url reach the server but no file of the run directory."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from test_build_e2e import _build, _finish

from rmskit.config import BuildConfig, strip_url_credentials
from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder

URL_SECRET = "UrlK3y" + "9f8e7d6c5b4a3210zz"


def test_userinfo_in_base_url_is_not_stored(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "run"
    with OpenAITestServer(responder=responder, latency=0.01) as srv:
        url = srv.base_url.replace("http://", f"http://user:{URL_SECRET}@")
        args = ("--embedder", "hashing", "--limit", "2", "--agreement", "3")
        rc, stdout, stderr = _finish(_build(photo_dir, out, url, *args))
    # userinfo is taken off the URL the client uses (the key variable wins; else the URL's
    # password is the bearer key), so the build works, and the credential is never stored.
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert URL_SECRET not in stdout + stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert URL_SECRET.encode() not in f.read_bytes(), f"credential from --base-url leaked into {f}"
    con = sqlite3.connect(out / "rms.sqlite")
    stored = json.loads(con.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
    con.close()
    assert stored["model"]["base_url"] == srv.base_url  # the endpoint is kept, the credential is not
    assert stored["verify_agreement"] == 3  # --agreement maps to the config field


def test_stored_urls_lose_userinfo_and_secret_query_parameters() -> None:
    assert (
        strip_url_credentials("https://u:p@h.example:8443/v1?api_key=K&x=1")
        == "https://h.example:8443/v1?x=1"
    )
    assert strip_url_credentials("http://h/v1?token=K&sig=S&access_token=T") == "http://h/v1"
    assert strip_url_credentials("/data/photos") == "/data/photos"
    cfg = BuildConfig.model_validate(
        {
            "model": {"spec": "openai:m", "base_url": "http://a:K1@h/v1"},
            "stage_models": {"verify": {"base_url": "http://b:K2@h/v1?key=K3"}},
        }
    )
    dumped = json.dumps(cfg.public_dump())
    assert not any(k in dumped for k in ("K1", "K2", "K3"))
    assert cfg.model.base_url == "http://a:K1@h/v1"  # the live config still talks to the server with it


def test_a_key_in_the_url_is_used_as_the_bearer_key_when_no_variable_is_set(monkeypatch) -> None:
    from rmskit.config import BackendConfig
    from rmskit.models.openai_compat import OpenAIBackend

    monkeypatch.delenv("RMSKIT_TEST_UNSET_KEY", raising=False)
    cfg = BackendConfig(
        spec="openai:m", base_url="http://u:K123@127.0.0.1:9/v1", api_key_env="RMSKIT_TEST_UNSET_KEY"
    )
    backend = OpenAIBackend(cfg)
    assert backend._headers["Authorization"] == "Bearer K123"
    assert backend._chat_url == "http://127.0.0.1:9/v1/chat/completions"  # no userinfo left in it
    assert "K123" not in backend.where
