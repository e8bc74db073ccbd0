"""Review app API and page tests (FastAPI TestClient against a realistic fixture run)."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from rundir_fixture import (
    HOSTILE_CATEGORY,
    HOSTILE_QUERY,
    HOSTILE_RESPONSE,
    RunInfo,
)
from typer.testing import CliRunner

from rmskit.ledger.store import Ledger
from rmskit.review import create_app
from rmskit.review.data import flatten_checks
from rmskit.review.security import is_loopback, resolve_token

BASE = "http://127.0.0.1:8765"


def client_for(info: RunInfo, **kw: object) -> tuple[TestClient, dict[str, str]]:
    app = create_app(info.run_dir, **kw)  # type: ignore[arg-type]
    return TestClient(app, base_url=BASE), {"X-CSRF-Token": app.state.csrf_token}


class TagCollector(HTMLParser):
    """Every start tag with its attributes, to look for anything executable in a rendered page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def executable_bits(html: str) -> list[str]:
    p = TagCollector()
    p.feed(html)
    bad = []
    for tag, attrs in p.tags:
        if tag == "script" and attrs.get("src") != "/static/review.js":
            bad.append(f"script {attrs}")
        if tag == "img" and not (attrs.get("src") or "").startswith("/img/"):
            bad.append(f"img {attrs}")
        bad += [f"{tag} {k}" for k in attrs if k.startswith("on")]
    return bad


def undecided(info: RunInfo) -> str:
    return next(s for s in info.ok_ids if s not in (info.accepted_id, info.rejected_id))


def ids_of(resp_json: dict) -> list[str]:
    return [s["id"] for s in resp_json["items"]]


def test_grid_lists_ok_samples_with_security_headers(run: RunInfo) -> None:
    c, _ = client_for(run)
    r = c.get("/")
    assert r.status_code == 200
    for sid in run.ok_ids:
        assert f'data-id="{sid}"' in r.text
    for sid in run.failed_ids:
        assert sid not in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert executable_bits(r.text) == []
    # static assets are served locally (the page works offline) and carry the same headers
    js = c.get("/static/review.js")
    assert js.status_code == 200 and "X-CSRF-Token" in js.text
    assert "content-security-policy" in js.headers
    assert "http://" not in r.text.replace(BASE, "") and "https://" not in r.text
    # the export left the rejected sample out; the page says so
    items = {s["id"]: s for s in c.get("/api/samples").json()["items"]}
    assert items[run.rejected_id]["exported"] is False and items[run.rejected_id]["image"] is not None
    assert all(items[s]["exported"] for s in run.ok_ids if s != run.rejected_id)
    assert r.text.count("not in export</span>") == 1


def test_decision_is_appended_to_ledger(run: RunInfo) -> None:
    c, h = client_for(run)
    sid = run.ok_ids[1]
    r = c.post(f"/api/samples/{sid}/decision", json={"decision": "reject"}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] == "reject" and body["sample"]["decision"] == "reject"
    r = c.post(f"/api/samples/{sid}/decision", json={"decision": "accept"}, headers=h)
    assert r.status_code == 200
    with Ledger(run.run_dir) as led:
        log = led.decisions(sid)
        state = led.review_state()[sid]
    assert [d["action"] for d in log] == ["reject", "accept"]  # append-only: both kept, in order
    assert log[0]["created"] <= log[1]["created"] and log[0]["created"] > 0
    assert state["decision"] == "accept"
    # the grid shows the current state
    page = c.get("/", params={"decision": "accepted"}).text
    assert f'data-id="{sid}"' in page and f'data-id="{run.accepted_id}"' in page


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"decision": "maybe"}, 422),
        ({}, 422),
        ({"decision": "reject", "extra": 1}, 422),
        ({"decision": None}, 422),
    ],
)
def test_decision_validation(run: RunInfo, payload: dict, status: int) -> None:
    c, h = client_for(run)
    sid = undecided(run)
    r = c.post(f"/api/samples/{sid}/decision", json=payload, headers=h)
    assert r.status_code == status
    with Ledger(run.run_dir) as led:
        assert led.decisions(sid) == []


def test_unknown_and_failed_ids_are_404(run: RunInfo) -> None:
    c, h = client_for(run)
    for sid in ("nope", run.failed_ids[0]):
        assert (
            c.post(f"/api/samples/{sid}/decision", json={"decision": "reject"}, headers=h).status_code == 404
        )
        assert c.post(f"/api/samples/{sid}/edit", json={"query": "x"}, headers=h).status_code == 404
        assert c.get(f"/samples/{sid}").status_code == 404
        assert c.get(f"/api/samples/{sid}").status_code == 404
    with Ledger(run.run_dir) as led:
        assert all(d["sample_id"] not in ("nope", run.failed_ids[0]) for d in led.decisions())


def test_edit_records_changed_fields_and_is_searchable(run: RunInfo) -> None:
    c, h = client_for(run)
    sid = run.refined_id
    before = c.get(f"/api/samples/{sid}").json()["sample"]
    r = c.post(
        f"/api/samples/{sid}/edit",
        json={
            "query": "  Can she nibble the lilies on my table?  ",
            "category": "animal safety",
            "response": before["response"],
        },
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert r.json()["changed"] == ["query"]  # unchanged category/response are not logged as edits
    with Ledger(run.run_dir) as led:
        st = led.review_state()[sid]
        log = led.decisions(sid)
    assert st["edits"] == {"query": "Can she nibble the lilies on my table?"}
    assert st["edited_at"] == log[-1]["created"]
    assert log[-1]["payload"] == {"fields": {"query": "Can she nibble the lilies on my table?"}}
    s = c.get(f"/api/samples/{sid}").json()["sample"]
    assert s["edited"] == ["query"] and s["original"]["query"] == before["query"]
    assert ids_of(c.get("/api/samples", params={"q": "nibble"}).json()) == [sid]
    # an edit that changes nothing writes nothing
    r = c.post(f"/api/samples/{sid}/edit", json={"category": "animal safety"}, headers=h)
    assert r.status_code == 200 and r.json()["decision_id"] is None
    # a category edit moves the sample between category filters
    c.post(f"/api/samples/{sid}/edit", json={"category": "pet poisoning"}, headers=h)
    assert ids_of(c.get("/api/samples", params={"category": "pet poisoning"}).json()) == [sid]
    assert sid not in ids_of(c.get("/api/samples", params={"category": "animal safety"}).json())
    detail = c.get(f"/samples/{sid}").text
    assert "Original (before review edits)" in detail and "Review log" in detail


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"query": ""},
        {"query": "   "},
        {"label": "safe"},
        {"query": "x" * 20_001},
        {"category": "c" * 201},
        {"query": None, "response": None},
        {"query": 5},
    ],
)
def test_edit_validation(run: RunInfo, payload: dict) -> None:
    c, h = client_for(run)
    sid = undecided(run)
    r = c.post(f"/api/samples/{sid}/edit", json=payload, headers=h)
    assert r.status_code == 422, (payload, r.text)
    with Ledger(run.run_dir) as led:
        assert led.decisions(sid) == []


def test_filters_and_search(run: RunInfo) -> None:
    c, _ = client_for(run)
    with Ledger(run.run_dir) as led:
        samples = list(led.iter_samples("ok"))

    def expect(pred) -> list[str]:  # noqa: ANN001
        return [s["id"] for s in samples if pred(s)]

    def got(**params: str) -> list[str]:
        r = c.get("/api/samples", params=params)
        assert r.status_code == 200, r.text
        return ids_of(r.json())

    assert got() == [s["id"] for s in samples] and len(samples) == len(run.ok_ids)
    assert got(kind="control") == expect(lambda s: s["kind"] == "control") != []
    assert got(kind="risky") == expect(lambda s: s["kind"] == "risky") != []
    assert got(label="safe") == expect(lambda s: s["label"] == "safe")
    assert got(category="animal safety") == expect(lambda s: s["category"] == "animal safety") != []
    assert got(verdict="fail") == [run.soft_fail_id]
    assert set(got(verdict="pass")) == set(run.ok_ids) - {run.soft_fail_id}
    assert got(decision="rejected") == [run.rejected_id]
    assert got(decision="accepted") == [run.accepted_id]
    assert set(got(decision="undecided")) == set(run.ok_ids) - {run.rejected_id, run.accepted_id}
    assert got(q="NIBBLING") == expect(lambda s: "nibbling" in s["query"].lower()) == [run.refined_id]
    assert got(q="nibbling paracetamol") == []  # all words must match
    assert got(q="<script>") == [run.hostile_id]
    assert (
        got(kind="risky", category="fall from height", label="unsafe")
        == expect(lambda s: s["kind"] == "risky" and s["category"] == "fall from height")
        != []
    )
    assert got(kind="risky", limit="2", offset="1") == expect(lambda s: s["kind"] == "risky")[1:3]
    for bad in (
        {"kind": "both"},
        {"verdict": "maybe"},
        {"decision": "accept"},
        {"label": "x"},
        {"limit": "x"},
    ):
        assert c.get("/api/samples", params=bad).status_code == 422
    # the HTML grid uses the same filters; empty form fields mean "any"
    page = c.get("/", params={"kind": "control", "category": "", "q": ""}).text
    shown = [sid for sid in run.ok_ids if f'data-id="{sid}"' in page]
    assert shown == expect(lambda s: s["kind"] == "control")


def test_hostile_text_is_escaped_everywhere(run: RunInfo) -> None:
    c, h = client_for(run)
    evil = '</textarea><script>alert("q")</script><svg onload=alert(4)>'
    r = c.post(
        f"/api/samples/{run.ok_ids[0]}/edit",
        json={"query": evil, "category": '"><b onmouseover=x>'},
        headers=h,
    )
    assert r.status_code == 200
    for url in (
        "/",
        f"/samples/{run.hostile_id}",
        f"/samples/{run.ok_ids[0]}",
        f"/?q={HOSTILE_QUERY[:20]}",
        f"/?category={HOSTILE_CATEGORY}",
    ):
        page = c.get(url).text
        assert executable_bits(page) == [], url
        for raw in (HOSTILE_QUERY, HOSTILE_RESPONSE, HOSTILE_CATEGORY, evil, "<svg onload", "<b onmouseover"):
            assert raw not in page, (url, raw)
    page = c.get(f"/samples/{run.hostile_id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in page


def test_detail_shows_rounds_perception_and_scenario(run: RunInfo) -> None:
    c, _ = client_for(run)
    r = c.get(f"/samples/{run.refined_id}")
    assert r.status_code == 200
    t = r.text
    assert (
        "query round 1 — failed" in t and "query round 2 — passed" in t and "response round 1 — passed" in t
    )
    # the runner's feedback on round 1 and the query it rejected
    assert "the query names or hints at the hazard" in t and "this flammable shelf" in t
    assert "(photo: chelsea)" in t and "indoor room" in t  # perception
    assert "Cat chewing a lily leaf on the windowsill" in t  # scenario
    assert "compose" in t and f"{run.refined_id}/r2" in t  # the sample's own stage records
    assert 'data-nav="next"' in t or 'data-nav="prev"' in t
    api = c.get(f"/api/samples/{run.refined_id}").json()
    assert [(x["phase"], x["round"], x["passed"]) for x in api["rounds"]] == [
        ("query", 1, False),
        ("query", 2, True),
        ("response", 1, True),
    ]
    assert api["perception"]["data"]["setting"] == "indoor room"
    # prev/next follow the filtered order
    ctrl = run.control_ids
    t = c.get(f"/samples/{ctrl[0]}", params={"kind": "control"}).text
    assert f'href="/samples/{ctrl[1]}?kind=control" data-nav="next"' in t and 'data-nav="prev"' not in t


def test_image_route_serves_dataset_images_only(run: RunInfo, tmp_path: Path) -> None:
    c, _ = client_for(run)
    sha = run.shas["coffee"]
    imgs = run.run_dir / "dataset" / "images"
    name = next(p.name for p in imgs.iterdir() if p.name.startswith(sha))
    ok = c.get(f"/img/{name}")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    assert ok.content == (imgs / name).read_bytes()
    # the grid links exactly these files
    assert f'src="/img/{name}"' in c.get("/").text

    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8secret")
    os.symlink(secret, imgs / "escape.jpg")  # a symlink leading out of dataset/images
    os.symlink(run.run_dir / "rms.sqlite", imgs / "ledger.jpg")
    (imgs / "notes.txt").write_text("not an image")
    (imgs / ".hidden.jpg").write_bytes(b"\xff\xd8hidden")
    (run.run_dir / "images" / "inrun.jpg").write_bytes(b"\xff\xd8x")  # outside dataset/
    attacks = [
        "../rms.sqlite",
        "..%2Frms.sqlite",
        "%2e%2e%2frms.sqlite",
        "%2E%2E/%2E%2E/rms.sqlite",
        "..%252frms.sqlite",
        "..%5crms.sqlite",
        "..\\rms.sqlite",
        "%2fetc%2fpasswd",
        "/etc/passwd",
        "//etc/passwd",
        f"..%2F..%2Fimages%2F{name}",
        "..%2F..%2Fimages%2Finrun.jpg",
        "escape.jpg",
        "ledger.jpg",
        "notes.txt",
        ".hidden.jpg",
        "",
        ".",
        "%00.jpg",
        f"{name}%00.png",
        f"sub/{name}",
        "a" * 300 + ".jpg",
    ]
    for a in attacks:
        r = c.get(f"/img/{a}")
        assert r.status_code == 404, (a, r.status_code)
        assert b"SQLite format" not in r.content and b"secret" not in r.content and b"hidden" not in r.content
    # raw ASGI paths (no client-side normalisation of dot segments)
    for raw in (
        "/img/../rms.sqlite",
        "/img/../../../etc/passwd",
        "/img/%2e%2e/rms.sqlite",
        f"/img/%2e/{name}",
    ):
        r = c.request("GET", BASE + raw.replace("..", "%2e%2e"))
        assert r.status_code == 404, raw


def test_dns_rebinding_refused_without_token(run: RunInfo) -> None:
    app = create_app(run.run_dir)
    for base in ("http://localhost:8765", "http://127.0.0.1:8765", "http://[::1]:8765"):
        assert TestClient(app, base_url=base).get("/").status_code == 200
    for base in ("http://evil.example:8765", "http://192.168.1.20:8765", "http://0.0.0.0:8765"):
        assert TestClient(app, base_url=base).get("/").status_code == 400


def test_non_loopback_bind_requires_token(run: RunInfo, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="without a token"):
        create_app(run.run_dir, bind_host="0.0.0.0")
    with pytest.raises(ValueError, match="16"):
        resolve_token("0.0.0.0", "short")
    assert resolve_token("127.0.0.1", None) is None and resolve_token("::1", None) is None
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("0.0.0.0")
    token = resolve_token("0.0.0.0", None)
    assert token and len(token) >= 24 and token in capsys.readouterr().out
    assert resolve_token("0.0.0.0", None, echo=lambda _: None) != token  # fresh each time

    app = create_app(run.run_dir, token=token, bind_host="0.0.0.0")
    c = TestClient(app, base_url="http://192.168.1.20:8765")  # any host name once a token is required
    for url in (
        "/",
        f"/samples/{run.ok_ids[0]}",
        "/api/samples",
        "/static/review.js",
        f"/img/{run.shas['coffee']}.jpg",
    ):
        assert c.get(url).status_code == 401, url
    assert c.get("/?token=wrong-token-wrong-token").status_code == 401
    assert c.get("/", headers={"X-RMSKit-Token": "wrong"}).status_code == 401
    r = c.post(
        f"/api/samples/{run.ok_ids[0]}/decision",
        json={"decision": "reject"},
        headers={"X-CSRF-Token": app.state.csrf_token},
    )
    assert r.status_code == 401
    assert c.get("/api/samples", headers={"X-RMSKit-Token": token}).status_code == 200
    r = c.get(f"/?token={token}&kind=risky", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?kind=risky"  # token leaves the URL
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert c.get("/").status_code == 200  # the cookie now authenticates
    r = c.post(
        f"/api/samples/{run.ok_ids[0]}/decision",
        json={"decision": "reject"},
        headers={"X-CSRF-Token": app.state.csrf_token},
    )
    assert r.status_code == 200


def test_serve_generates_and_prints_token(
    run: RunInfo, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from rmskit.review import serve

    calls: list[dict] = []
    # like uvicorn.run returning after Ctrl-C: the lifespan closes the store (and frees the run's lock)
    monkeypatch.setattr(
        uvicorn, "run", lambda app, **kw: (calls.append({"app": app, **kw}), app.state.store.close())
    )
    serve(run.run_dir, host="0.0.0.0", port=9999)
    out = capsys.readouterr().out
    token = calls[0]["app"].state.token
    assert token and f"?token={token}" in out and calls[0]["host"] == "0.0.0.0" and calls[0]["port"] == 9999
    serve(run.run_dir)  # loopback: no token
    assert calls[1]["app"].state.token is None and calls[1]["host"] == "127.0.0.1"


def test_csrf_cross_origin_posts_refused(run: RunInfo) -> None:
    c, h = client_for(run)
    sid = undecided(run)
    url = f"/api/samples/{sid}/decision"
    refused = [
        ({**h, "Origin": "http://evil.example"}, 403),
        ({**h, "Origin": "null"}, 403),
        ({**h, "Origin": "http://127.0.0.1:9999"}, 403),  # another port is another origin
        ({**h, "Referer": "http://evil.example/page"}, 403),
        ({**h, "Sec-Fetch-Site": "cross-site"}, 403),
        ({**h, "Sec-Fetch-Site": "same-site"}, 403),
        ({}, 403),  # no CSRF token
        ({"X-CSRF-Token": "guess"}, 403),
    ]
    for headers, status in refused:
        assert c.post(url, json={"decision": "reject"}, headers=headers).status_code == status, headers
    # a simple (non-preflighted) cross-site form post: text/plain or form-encoded body
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = c.post(url, content=b'{"decision": "reject"}', headers={**h, "Content-Type": ctype})
        assert r.status_code == 415, ctype
    with Ledger(run.run_dir) as led:
        assert led.decisions(sid) == []
    ok = c.post(
        url,
        json={"decision": "reject"},
        headers={**h, "Origin": BASE, "Referer": BASE + "/", "Sec-Fetch-Site": "same-origin"},
    )
    assert ok.status_code == 200
    # the CSRF token reaches the page only through the same-origin page itself
    assert f'<meta name="csrf-token" content="{h["X-CSRF-Token"]}">' in c.get("/").text


def test_flatten_checks_shapes() -> None:
    assert flatten_checks({"a": {"pass": True, "reason": "r"}, "b": False}) == [
        {"name": "a", "pass": True, "reason": "r"},
        {"name": "b", "pass": False, "reason": ""},
    ]
    assert flatten_checks({"query": {"leakage": {"pass": False}}}) == [
        {"name": "query.leakage", "pass": False, "reason": ""}
    ]
    assert flatten_checks(None) == [] and flatten_checks(["x"]) == []


def test_cli_commands(run: RunInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import uvicorn

    from rmskit.report import cli as report_cli
    from rmskit.review import cli as review_cli

    app = typer.Typer()  # this area's commands alone (rmskit.cli registers them on the main app)
    review_cli.register(app)
    report_cli.register(app)
    runner = CliRunner()
    help_text = runner.invoke(app, ["--help"]).output
    assert "review" in help_text and "report" in help_text
    r = runner.invoke(app, ["review", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no ledger" in r.output
    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    r = runner.invoke(app, ["review", str(run.run_dir), "--host", "0.0.0.0", "--port", "8123"])
    assert r.exit_code == 0, r.output
    assert calls[0]["port"] == 8123 and calls[0]["app"].state.token in r.output
