"""The review server under attack: guessable tokens, huge or malformed bodies, invalid Unicode, a second
writer on the same run, a damaged ledger (schemathesis fuzzing is in test_review_fuzz.py)."""

from __future__ import annotations

import json
import os
import secrets

import pytest
import typer
from fastapi.testclient import TestClient
from rundir_fixture import RunInfo
from typer.testing import CliRunner

from rmskit.ledger import LEDGER_NAME, Ledger, RunLocked
from rmskit.review import create_app
from rmskit.review.security import MAX_BODY_BYTES, check_token, resolve_token

BASE = "http://127.0.0.1:8765"
WEAK_TOKENS = [
    " " * 24,  # whitespace only
    "abcdefgh ijklmnop qrstu",  # contains spaces
    "abcdefghijklmnop\t",  # a control character
    "a" * 40,  # one character repeated
    "abcdabcdabcdabcdabcd",  # a repeating unit
    "passwordpassword",
    "0000000011111111",  # two characters
    "correcthorse\nbattery",
]


def client_for(info: RunInfo, **kw: object) -> tuple[TestClient, dict[str, str]]:
    app = create_app(info.run_dir, **kw)  # type: ignore[arg-type]
    return TestClient(app, base_url=BASE), {"X-CSRF-Token": app.state.csrf_token}


def undecided(info: RunInfo) -> str:
    return next(s for s in info.ok_ids if s not in (info.accepted_id, info.rejected_id))


@pytest.mark.parametrize("token", WEAK_TOKENS)
def test_weak_tokens_are_refused_without_echo(token: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve_token("0.0.0.0", token)
    assert token.strip() not in str(err.value) or not token.strip()
    assert "secrets.token_urlsafe" in str(err.value)  # says how to make a good one


def test_strong_tokens_are_accepted(run: RunInfo) -> None:
    for token in (secrets.token_urlsafe(24), secrets.token_hex(16), "Tr0ub4dor&3-xkcd-936-Zq"):
        check_token(token)
    with pytest.raises(ValueError, match="printable ASCII"):
        create_app(run.run_dir, token="x" * 8 + " " + "y" * 8, bind_host="0.0.0.0")


def test_review_cli_refuses_a_weak_token(run: RunInfo) -> None:
    from rmskit.review import cli as review_cli

    app = typer.Typer()
    review_cli.register(app)
    app.command("noop")(lambda: None)
    weak = "qwertyqwertyqwertyqwerty"
    r = CliRunner().invoke(app, ["review", str(run.run_dir), "--host", "0.0.0.0", "--token", weak])
    assert r.exit_code == 2 and "too easy to guess" in r.output and weak not in r.output


def test_body_over_the_limit_is_413_and_never_echoed(run: RunInfo) -> None:
    c, h = client_for(run)
    sid = undecided(run)
    marker = "ECHO-" + secrets.token_hex(8)
    big = json.dumps({"query": marker + "x" * (MAX_BODY_BYTES + 10)})
    r = c.post(f"/api/samples/{sid}/edit", content=big, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 200 and marker not in r.text
    assert r.headers["content-security-policy"]  # the refusal carries the security headers too

    def chunks():  # no Content-Length: a chunked body that grows past the limit
        yield b'{"query": "' + marker.encode()
        for _ in range(20):
            yield b"y" * 100_000
        yield b'"}'

    r = c.post(
        f"/api/samples/{sid}/edit", content=chunks(), headers={**h, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and marker not in r.text
    r = c.post(f"/api/samples/{sid}/decision", content=b"{" + b" " * MAX_BODY_BYTES + b"}", headers=h)
    assert r.status_code == 413
    with Ledger(run.run_dir) as led:
        assert led.decisions(sid) == []


def test_validation_errors_never_echo_the_input(run: RunInfo) -> None:
    c, h = client_for(run)
    sid = undecided(run)
    marker = "ECHO-" + secrets.token_hex(8)
    for payload in (
        {"query": marker * 2000},  # too long
        {"query": marker, "label": marker},  # an unknown field
        {"decision": marker},
    ):
        url = f"/api/samples/{sid}/" + ("decision" if "decision" in payload else "edit")
        r = c.post(url, json=payload, headers=h)
        assert r.status_code == 422 and marker not in r.text, r.text
        assert r.json()["detail"][0]["loc"]  # still says where the problem is
    r = c.post(
        f"/api/samples/{sid}/edit",
        content=b'{"query": "' + marker.encode(),
        headers=h | {"Content-Type": "application/json"},
    )
    assert r.status_code == 422 and marker not in r.text  # broken JSON
    r = c.get(f"/api/samples/{marker}")
    assert r.status_code == 404 and marker not in r.text


def test_lone_surrogate_in_an_edit_is_400_with_a_reason(run: RunInfo) -> None:
    c, h = client_for(run)
    sid = undecided(run)
    for field in ("query", "response", "category"):
        body = '{"%s": "\\ud800x"}' % field  # noqa: UP031 - the JSON escape must reach the server as is
        r = c.post(
            f"/api/samples/{sid}/edit", content=body, headers={**h, "Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert "surrogate" in r.text and r.json()["detail"][0]["loc"][-1] == field
    with Ledger(run.run_dir) as led:
        assert led.decisions(sid) == []
    ok = c.post(f"/api/samples/{sid}/edit", json={"query": "emoji fine \U0001f525"}, headers=h)
    assert ok.status_code == 200  # real astral characters (valid surrogate pairs in JSON) still work


def test_a_second_writer_on_the_run_is_refused_naming_the_holder(run: RunInfo) -> None:
    app = create_app(run.run_dir)
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        create_app(run.run_dir)
    with pytest.raises(RunLocked):
        Ledger(run.run_dir, lock=True)  # what build and export take
    # read-only browsing works beside the writer, and refuses writes with a reason
    ro = TestClient(create_app(run.run_dir, read_only=True), base_url=BASE)
    sid = undecided(run)
    assert ro.get(f"/api/samples/{sid}").status_code == 200
    csrf = ro.app.state.csrf_token  # type: ignore[attr-defined]
    r = ro.post(f"/api/samples/{sid}/decision", json={"decision": "reject"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and "read-only" in r.text
    app.state.store.close()
    create_app(run.run_dir).state.store.close()  # free again once the first review has stopped


def test_review_cli_one_line_errors_for_locked_and_damaged_runs(run: RunInfo, tmp_path) -> None:  # noqa: ANN001
    from rmskit.review import cli as review_cli

    app = typer.Typer()
    review_cli.register(app)
    app.command("noop")(lambda: None)
    holder = Ledger(run.run_dir, lock=True)
    try:
        r = CliRunner().invoke(app, ["review", str(run.run_dir)])
        assert r.exit_code == 2 and "in use by pid" in r.output and "Traceback" not in r.output
    finally:
        holder.close()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LEDGER_NAME).write_bytes(b"garbage " * 100)
    r = CliRunner().invoke(app, ["review", str(bad)])
    assert r.exit_code == 2 and "damaged" in r.output and len(r.output.strip().splitlines()) == 1
