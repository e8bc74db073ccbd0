"""The review page in a real browser: headless Chromium (Debian package) driven by Playwright, against the
app served by uvicorn on a free loopback port. Reject / accept / edit through the UI, then export."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rundir_fixture import (
    CHROMIUM,
    CHROMIUM_ARGS,
    RunInfo,
    chromium_skip_reason,
)

from rmskit.export import write_dataset
from rmskit.ledger.store import Ledger
from rmskit.review import create_app

_skip = chromium_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(run: RunInfo) -> Iterator[str]:
    import uvicorn

    app = create_app(run.run_dir)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if not t.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{srv.config.port}"
    srv.should_exit = True
    t.join(timeout=10)


@pytest.fixture
def page(server: str) -> Iterator[tuple]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems: list[str] = []
        pg.on(
            "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        pg.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))  # alert() = XSS
        pg.on(
            "request",
            lambda r: None if r.url.startswith((server, "data:")) else problems.append(f"offsite {r.url}"),
        )
        yield pg, problems
        browser.close()


def wait_until(pg, expression: str, timeout_s: float = 20.0) -> None:  # noqa: ANN001
    """Poll `expression` from here until it is true. Not `page.wait_for_function`: once its first check
    is false it polls inside the page through `eval`, which the review page's CSP (no 'unsafe-eval')
    refuses, so it failed exactly when there was something to wait for (a CI run, 2026-12-04)."""
    deadline = time.monotonic() + timeout_s
    while not pg.evaluate(expression):
        if time.monotonic() > deadline:
            pytest.fail(f"still false after {timeout_s} s: {expression}")
        pg.wait_for_timeout(50)


def selected_id(pg) -> str | None:  # noqa: ANN001
    return pg.evaluate("document.querySelector('article.card.selected')?.dataset.id ?? null")


def test_reject_in_browser_then_export_leaves_it_out(
    run: RunInfo, server: str, page: tuple, tmp_path: Path
) -> None:
    pg, problems = page
    pg.goto(server + "/")
    pg.wait_for_selector("article.card")
    order = pg.eval_on_selector_all("article.card", "els => els.map(e => e.dataset.id)")
    assert set(order) == set(run.ok_ids)
    # all thumbnails load from the dataset folder (waited for: the cards can show before their images
    # have finished loading, which failed one CI run)
    wait_until(pg, "Array.from(document.images).every(i => i.complete)")
    assert pg.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

    # keyboard: j moves the selection, r rejects the selected sample (then the selection advances)
    target = run.hostile_id
    for _ in range(order.index(target) + 1):
        pg.keyboard.press("j")
    assert selected_id(pg) == target
    pg.keyboard.press("r")
    pg.wait_for_selector(f'article.card.decision-reject[data-id="{target}"]')
    assert pg.text_content(f'article.card[data-id="{target}"] [data-role="state"]') == "rejected"
    assert selected_id(pg) == order[order.index(target) + 1]
    assert pg.text_content('[data-count="reject"]') == "2"  # the fixture's rejection + this one
    pg.keyboard.press("k")
    assert selected_id(pg) == target

    # mouse: the Reject button of another card; a accepts the selected one
    other = run.refined_id
    pg.click(f'article.card[data-id="{other}"] button[data-action="reject"]')
    pg.wait_for_selector(f'article.card.decision-reject[data-id="{other}"]')
    undecided = next(s for s in order if s not in (target, other, run.rejected_id, run.accepted_id))
    pg.click(f'article.card[data-id="{undecided}"] .meta')
    pg.keyboard.press("a")
    pg.wait_for_selector(f'article.card.decision-accept[data-id="{undecided}"]')
    pg.keyboard.press("k")  # back from the auto-advanced selection
    assert selected_id(pg) == undecided

    # e opens the edit dialog for the selected card; markup typed in stays text
    evil = '<img src=x onerror=alert("edit")> How hot is it?'
    pg.keyboard.press("e")
    pg.wait_for_selector("#edit-dialog[open]")
    assert pg.input_value('#edit-form [name="query"]') == pg.text_content(
        f'article.card[data-id="{undecided}"] [data-field="query"]'
    )
    pg.fill('#edit-form [name="query"]', evil)
    pg.fill('#edit-form [name="category"]', "kitchen burns")
    pg.click('#edit-form button[type="submit"]')
    pg.wait_for_selector("#edit-dialog", state="hidden")
    card = f'article.card[data-id="{undecided}"]'
    assert pg.text_content(f'{card} [data-field="query"]') == evil
    assert pg.text_content(f'{card} [data-field="category"]') == "kitchen burns"
    assert pg.locator(f"{card} img[onerror]").count() == 0
    pg.screenshot(path=str(tmp_path / "review-grid.png"), full_page=True)

    # the decisions landed in the ledger, append-only
    with Ledger(run.run_dir) as led:
        state = led.review_state()
    assert state[target]["decision"] == "reject" and state[other]["decision"] == "reject"
    assert state[undecided]["decision"] == "accept"
    assert state[undecided]["edits"] == {"query": evil.strip(), "category": "kitchen burns"}

    # the export honours the review: rejected samples left out, edits used
    write_dataset(run.run_dir)
    rows = {}
    for line in (run.run_dir / "dataset" / "samples.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["id"]] = row
    assert target not in rows and other not in rows and run.rejected_id not in rows
    assert rows[undecided]["query"] == evil.strip() and rows[undecided]["category"] == "kitchen burns"
    assert rows[undecided].get("edited"), "edit provenance kept"
    assert {"query", "category"} <= set(rows[undecided]["edited"]["fields"])

    # after a reload the page still shows the decisions (they come from the ledger)
    pg.reload()
    pg.wait_for_selector(f'article.card.decision-reject[data-id="{target}"]')
    assert problems == []


def test_detail_page_keyboard_and_filters(run: RunInfo, server: str, page: tuple, tmp_path: Path) -> None:
    pg, problems = page
    pg.goto(server + "/?kind=control")
    pg.wait_for_selector("article.card")
    controls = pg.eval_on_selector_all("article.card", "els => els.map(e => e.dataset.id)")
    assert controls == run.control_ids
    pg.keyboard.press("j")
    pg.keyboard.press("Enter")
    pg.wait_for_url(f"**/samples/{controls[0]}?kind=control")
    pg.keyboard.press("j")  # next within the filtered list
    pg.wait_for_url(f"**/samples/{controls[1]}?kind=control")
    pg.keyboard.press("a")
    pg.wait_for_selector(f'article.card.decision-accept[data-id="{controls[1]}"]')
    assert "accept" in (pg.text_content('[data-role="history"]') or "")

    pg.goto(server + f"/samples/{run.refined_id}")
    assert pg.locator(".round.fail").count() == 1 and pg.locator(".round.pass").count() == 2
    assert pg.evaluate("document.querySelector('.detail-image img').naturalWidth") > 0
    pg.screenshot(path=str(tmp_path / "review-detail.png"), full_page=True)
    # the search box: / focuses it, typing does not trigger shortcuts
    pg.goto(server + "/")
    pg.keyboard.press("/")
    pg.keyboard.type("nibbling")
    pg.keyboard.press("Enter")
    pg.wait_for_url("**/?q=nibbling*")
    ids = pg.eval_on_selector_all("article.card", "els => els.map(e => e.dataset.id)")
    assert run.refined_id in ids and len(ids) < len(run.ok_ids)
    with Ledger(run.run_dir) as led:
        assert led.review_state()[controls[1]]["decision"] == "accept"
        assert all(d["action"] == "accept" for d in led.decisions(controls[1]))
    assert problems == []
