"""The export writer's safety mechanics called directly (rmskit.export.writer): the atomic folder swap,
refusing to replace a folder rmskit did not write, cleaning only dead processes' leftovers, and the file
listing the CLI prints. Pinned where `make mutate` found test_export.py loose."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rmskit.export import writer


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no such process now (pids are not reused this fast)


def test_pid_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert writer._pid_alive(os.getpid())
    assert not writer._pid_alive(_dead_pid())

    def not_permitted(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(writer.os, "kill", not_permitted)
    assert writer._pid_alive(12345)  # exists, owned by someone else: alive


def test_clean_stale_with_hyphens_in_the_name(tmp_path: Path) -> None:
    dead = _dead_pid()
    left = tmp_path / f".my-data-set.tmp-{dead}-abcd1234"
    left.mkdir()
    writer._clean_stale(tmp_path, "my-data-set")
    assert not left.exists()


def test_atomic_dir_swaps_in_and_replaces_its_own_output(tmp_path: Path) -> None:
    final = tmp_path / "out" / "ds"
    with writer.atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".ds.tmp-") and not any(tmp.iterdir())
        (tmp / "a.txt").write_text("one")
        (tmp / writer.MARKER).write_text("{}")
    assert (final / "a.txt").read_text() == "one"
    with writer.atomic_dir(final) as tmp:  # ours (marker): replaced as a whole
        (tmp / "b.txt").write_text("two")
        (tmp / writer.MARKER).write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == [writer.MARKER, "b.txt"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["ds"]  # no temp or old folder left


def test_atomic_dir_failure_leaves_the_previous_output(tmp_path: Path) -> None:
    final = tmp_path / "ds"
    final.mkdir()
    (final / writer.MARKER).write_text("{}")
    (final / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), writer.atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("x")
        raise KeyboardInterrupt
    assert (final / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_atomic_dir_refuses_a_foreign_folder(tmp_path: Path) -> None:
    final = tmp_path / "photos"
    final.mkdir()
    (final / "mine.jpg").write_text("x")
    with pytest.raises(
        writer.ExportError,
        match=r"^.*photos exists and was not written by rmskit export; refusing to replace it$",
    ):
        with writer.atomic_dir(final):
            pass
    assert (final / "mine.jpg").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with writer.atomic_dir(empty) as tmp:  # an empty folder may be filled
        (tmp / "x.txt").write_text("x")
    assert (empty / "x.txt").exists()


def test_clean_stale_removes_only_dead_writers_leftovers(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getpid()
    names = {
        f".ds.tmp-{dead}-abcd1234": False,  # a crashed write: removed
        f".ds.old-{dead}-abcd1234": False,
        f".ds.tmp-{alive}-abcd1234": True,  # a write in progress: kept
        ".ds.tmp-notapid-abcd1234": True,  # not ours to judge: kept
        f".other.tmp-{dead}-abcd1234": True,  # another export's name
    }
    for n in names:
        (tmp_path / n).mkdir()
    (tmp_path / f".ds.tmp-{dead}-file0000").write_text("a file, not a folder")
    writer._clean_stale(tmp_path, "ds")
    for n, kept in names.items():
        assert (tmp_path / n).exists() == kept, n
    assert (tmp_path / f".ds.tmp-{dead}-file0000").exists()
    with writer.atomic_dir(tmp_path / "ds"):  # atomic_dir cleans before writing
        pass
    assert not (tmp_path / f".ds.old-{dead}-abcd1234").exists()


def test_files_listing(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.parquet").write_text("x")
    (tmp_path / "README.md").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_text("x")
    assert writer._files(tmp_path) == ["README.md", "data/train.parquet", "images/ (3 files)"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "samples.jsonl").write_text("")
    assert writer._files(bare) == ["samples.jsonl"]
    # the order of sorted Paths (by parts: "data/x" before "data-x"), nested dirs, an "images" below the top
    for rel in ("data-x.txt", "data/a/b.parquet", "sub/images/c.jpg", "sub/.hid", ".dir/e.txt", "Z.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    old = [
        p.relative_to(tmp_path).as_posix()
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file() and not p.relative_to(tmp_path).as_posix().startswith("images/") and p.name[0] != "."
    ]
    assert writer._files(tmp_path) == [*old, "images/ (3 files)"]
    assert writer._files(tmp_path)[:4] == [".dir/e.txt", "README.md", "Z.md", "bare/samples.jsonl"]
    assert writer._card_files({"train": ["train.parquet"], "test": ["test.parquet"]}, True) == [
        "README.md",
        "data/train.parquet",
        "data/test.parquet",
        "samples.jsonl",
        "images/<sha256>.<ext>",
    ]
    assert writer._card_files({"train": ["t.parquet"]}, False) == ["README.md", "data/t.parquet"]


def test_unknown_format_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    msg = r"^unknown format 'csv'; choose one of jsonl, hf, llava, sharegpt, judge$"
    with pytest.raises(ValueError, match=msg):
        writer.export(tmp_path / "no-run", "csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=msg):
        writer.export_summary(tmp_path / "no-run", "csv")  # type: ignore[arg-type]


def test_every_format_layout_marker_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Function-scoped on purpose: test_export.py builds its exports once in a module fixture, which
    mutmut credits to the first test only, so layout mutants went unchecked there."""
    import json

    from test_export import SECRET, build_ledger

    import rmskit

    monkeypatch.setenv("RMSKIT_TEST_API_KEY", SECRET)
    run = build_ledger(tmp_path / "run")
    ds = writer.write_dataset(run.run_dir)
    assert ds.format == "dataset" and ds.path == str(run.run_dir / "dataset")
    n_images = len(list((run.run_dir / "dataset" / "images").iterdir()))
    assert ds.images == n_images > 0 and ds.samples == sum(ds.splits.values()) > 0
    assert set(ds.splits) == {"train", "test"} and ds.edited == 1 and ds.dropped["rejected in review"] == 1
    assert (
        ds.files[0] == "README.md"
        and "samples.jsonl" in ds.files
        and ds.files[-1] == f"images/ ({n_images} files)"
    )
    assert any(f.startswith("data/") and f.endswith(".parquet") for f in ds.files)
    layouts = {
        "jsonl": {"samples.jsonl", "images"},
        "hf": {"README.md", "data"},
        "llava": {"train.json", "test.json", "dataset_info.json", "images"},
        "sharegpt": {"train.json", "test.json", "dataset_info.json", "images"},
    }
    for fmt, want in layouts.items():
        out = writer.export(run.run_dir, fmt)  # type: ignore[arg-type]
        assert out == run.run_dir / "exports" / fmt
        assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == want, fmt
        marker = json.loads((out / writer.MARKER).read_text())
        assert marker["format"] == fmt and marker["run_dir"] == str(run.run_dir.resolve())
        assert marker["rmskit_version"] == rmskit.__version__ and isinstance(marker["written_at"], float)
        if "images" in want:
            assert len(list((out / "images").iterdir())) == n_images
    judge = writer.export(run.run_dir, "judge")
    assert (judge / "images").is_dir() and json.loads((judge / writer.MARKER).read_text())[
        "format"
    ] == "judge"
    assert (judge / "train.json").is_file()
    summary = writer.export_summary(run.run_dir, "jsonl", tmp_path / "elsewhere")
    assert summary.format == "jsonl" and summary.path == str(tmp_path / "elsewhere")
    assert summary.files == ["samples.jsonl", f"images/ ({n_images} files)"] and summary.samples == ds.samples
    assert json.loads((run.run_dir / "dataset" / writer.MARKER).read_text())["format"] == "dataset"


def test_judge_probes_and_balance_reach_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from test_export import SECRET, build_ledger

    from rmskit.ledger.store import Ledger

    monkeypatch.setenv("RMSKIT_TEST_API_KEY", SECRET)
    run = build_ledger(tmp_path / "run")
    judge = writer.export(run.run_dir, "judge")
    llava = writer.export(run.run_dir, "llava")
    assert "rmskit_judge_train" in json.loads(
        (judge / "dataset_info.json").read_text()
    )  # judge items, not chats
    assert "rmskit_judge_train" not in json.loads((llava / "dataset_info.json").read_text())
    led = Ledger(run.run_dir)
    led.set_meta("probes", {"text_only_leakage": 0.123})
    led.close()
    writer.write_dataset(run.run_dir)  # probe numbers stored in the run reach the cards
    assert "0.123" in (run.run_dir / "dataset" / "README.md").read_text()
    assert "0.123" in (writer.export(run.run_dir, "hf") / "README.md").read_text()
    writer.write_dataset(run.run_dir, probes={"other": 0.456})  # given probes win over stored ones
    card = (run.run_dir / "dataset" / "README.md").read_text()
    assert "0.456" in card and "0.123" not in card
    full = writer.export_summary(run.run_dir, "jsonl", tmp_path / "full")
    capped = writer.export_summary(run.run_dir, "jsonl", tmp_path / "capped", balance=1)
    assert capped.samples < full.samples and capped.dropped.get("category cap", 0) > 0
    assert writer.write_dataset(run.run_dir, balance=1).dropped.get("category cap", 0) > 0
    out = writer.export(run.run_dir, "jsonl", tmp_path / "b1", balance=1)
    assert len((out / "samples.jsonl").read_text().splitlines()) == capped.samples


def test_images_are_copied_when_hard_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    src = tmp_path / "a.jpg"
    src.write_bytes(b"jpeg bytes")

    def no_links(*_a: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(writer.os, "link", no_links)
    prep = SimpleNamespace(image_files={"ab": str(src)}, image_name=lambda sha: f"{sha}.jpg")
    writer._link_images(prep, tmp_path / "out" / "images")  # type: ignore[arg-type]
    assert (tmp_path / "out" / "images" / "ab.jpg").read_bytes() == b"jpeg bytes"


def test_pid_alive_only_probes_a_live_process() -> None:
    """The liveness probe is signal 0: it must not disturb the process it asks about."""
    # the child restores SIGHUP's default action (dying), which it may inherit as ignored (nohup)
    code = "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert writer._pid_alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.3)  # still running: it got no real signal
    finally:
        child.kill()
        child.wait()


def test_clean_stale_ignores_a_leftover_it_cannot_remove(tmp_path: Path) -> None:
    """A leftover that rmtree refuses (here a symlink to a folder) is left alone; the export goes on
    and the folder the link points to is untouched."""
    dead = _dead_pid()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    link = tmp_path / f".ds.tmp-{dead}-abcd1234"
    link.symlink_to(target, target_is_directory=True)
    writer._clean_stale(tmp_path, "ds")
    with writer.atomic_dir(tmp_path / "ds") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "ds" / "a.txt").read_text() == "a"
    assert link.is_symlink() and (target / "precious.txt").read_text() == "keep"


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """The C locale's ASCII as the default file encoding (as on a bare server or a Windows code page):
    files written without an explicit encoding then fail on non-ASCII text."""
    import locale

    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def test_jsonl_and_card_are_utf8_whatever_the_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ascii_locale: None
) -> None:
    from test_export import SECRET, build_ledger

    from rmskit.export.prepare import prepare
    from rmskit.ledger.store import Ledger

    monkeypatch.setenv("RMSKIT_TEST_API_KEY", SECRET)
    run = build_ledger(tmp_path / "run")
    first = next(iter(prepare(run.run_dir).samples)).id
    query = "Ist das gefährlich? 危险吗"
    with Ledger(run.run_dir) as led:
        led.execute("UPDATE samples SET data = json_set(data, '$.query', ?) WHERE id = ?", (query, first))
    prep = prepare(run.run_dir)
    writer._write_jsonl(prep, tmp_path / "s.jsonl")
    lines = (tmp_path / "s.jsonl").read_bytes().decode("utf-8").splitlines()
    assert lines == [s.model_dump_json() for s in prep.samples]
    assert sum(query in line for line in lines) == 1
    writer._write_hf(prep, tmp_path / "hf", None, with_jsonl=False)
    card = (tmp_path / "hf" / "README.md").read_bytes().decode("utf-8")
    assert "Hamming distance ≤ " in card  # the card has non-ASCII text of its own


def test_card_lists_data_files_export_time_and_jsonl_only_when_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import calendar
    import re
    import time

    from test_export import SECRET, build_ledger

    monkeypatch.setenv("RMSKIT_TEST_API_KEY", SECRET)
    run = build_ledger(tmp_path / "run")
    before = time.time()
    writer.write_dataset(run.run_dir)
    hf = writer.export(run.run_dir, "hf")
    for root, with_jsonl in ((run.run_dir / "dataset", True), (hf, False)):
        card = (root / "README.md").read_text(encoding="utf-8")
        front = card.split("---\n")[1]
        assert "data_files:\n" in front
        assert "  - split: train\n    path: data/train-*.parquet\n" in front
        assert "  - split: test\n    path: data/test-*.parquet\n" in front
        when = re.search(r"exported (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", card)
        assert when is not None
        stamp = calendar.timegm(time.strptime(when.group(1), "%Y-%m-%d %H:%M:%S"))
        assert before - 1 <= stamp <= time.time() + 1
        assert ("- `samples.jsonl`\n" in card) is with_jsonl
        assert ("- `images/<sha256>.<ext>`\n" in card) is with_jsonl
        parquet = sorted(p.relative_to(root).as_posix() for p in (root / "data").iterdir())
        assert parquet and all(f"- `{p}`\n" in card for p in parquet)


def test_llava_and_sharegpt_exports_have_their_own_record_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from test_export import SECRET, build_ledger

    monkeypatch.setenv("RMSKIT_TEST_API_KEY", SECRET)
    run = build_ledger(tmp_path / "run")
    llava = json.loads((writer.export(run.run_dir, "llava") / "train.json").read_text(encoding="utf-8"))
    share = json.loads((writer.export(run.run_dir, "sharegpt") / "train.json").read_text(encoding="utf-8"))
    assert llava and len(llava) == len(share)
    for lr, sr in zip(llava, share, strict=True):
        assert set(lr) == {"id", "image", "conversations"} and set(sr) == {"id", "messages", "images"}
        assert lr["id"] == sr["id"] and [lr["image"]] == sr["images"]
        assert [t["from"] for t in lr["conversations"]] == ["human", "gpt"]
        assert lr["conversations"][0]["value"] == "<image>\n" + sr["messages"][0]["content"][len("<image>") :]
    info = json.loads((run.run_dir / "exports" / "llava" / "dataset_info.json").read_text())
    assert info["rmskit_train"]["columns"] == {"messages": "conversations", "images": "image"}
