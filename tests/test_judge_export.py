"""`rmskit export --format judge`: the guard-training items are exactly what `rmskit score` trains on."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from test_export import Run, _jsonl, run  # noqa: F401  (module-scoped run fixture)
from typer.testing import CliRunner

from rmskit.export import cli as export_cli
from rmskit.export.writer import FORMATS


def test_judge_records_match_the_score_training_items(run: Run) -> None:  # noqa: F811
    from rmskit.scoring.adapters import load_benchmark
    from rmskit.scoring.judge import Judge, answer_text
    from rmskit.scoring.prompts import DEFAULT_PROMPT, load_prompt

    assert "judge" in FORMATS
    out = run.exports["judge"]
    rows = {r["id"]: r for r in _jsonl(run.run_dir / "dataset" / "samples.jsonl")}
    # what `score` trains on when given this run: the rmskit adapter's samples through Judge._messages
    bench = {s.id: s for s in load_benchmark("rmskit", run.run_dir).samples}
    fake = SimpleNamespace(prompt_version=DEFAULT_PROMPT)
    seen = 0
    for split in ("train", "test"):
        recs = json.loads((out / f"{split}.json").read_text())
        assert {r["id"] for r in recs} == {i for i, r in rows.items() if r["split"] == split}
        for r in recs:
            src = rows[r["id"]]
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].count("<image>") == len(r["images"]) == 1
            assert (out / r["images"][0]).is_file()
            assert r["verdict"] == src["label"] and r["category"] == src["category"]
            assert r["query"] == src["query"] and r["prompt_version"] == DEFAULT_PROMPT
            msgs = Judge._messages(fake, bench[r["id"]], answer_text(bench[r["id"]]))  # type: ignore[arg-type]
            assert user["content"] == "<image>" + msgs[0]["content"][-1]["text"]
            assert assistant["content"] == msgs[1]["content"][0]["text"]
            assert src["query"] in user["content"] and load_prompt().splitlines()[0] in user["content"]
            want = "safe" if src["label"] == "safe" else f"unsafe\ncategory: {src['category']}"
            assert assistant["content"] == want
            seen += 1
    assert seen == len(rows) and {r["label"] for r in rows.values()} == {"safe", "unsafe"}
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"rmskit_judge_train", "rmskit_judge_test"}
    assert info["rmskit_judge_train"]["file_name"] == "train.json"
    assert info["rmskit_judge_train"]["columns"] == {"messages": "messages", "images": "images"}


def test_judge_prompt_is_versioned() -> None:
    from rmskit.scoring.prompts import judge_turns

    user, answer = judge_turns("Can I nap here?", "unsafe", "fire")
    assert user.endswith("User request: Can I nap here?") and answer == "unsafe\ncategory: fire"
    with pytest.raises(FileNotFoundError):
        judge_turns("q", "safe", "x", version="judge.v999")


def test_cli_judge_format(run: Run, tmp_path: Path) -> None:  # noqa: F811
    app = typer.Typer()
    export_cli.register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "j"
    res = CliRunner().invoke(app, ["export", str(run.run_dir), "--format", "judge", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(judge)" in res.output and (out / "dataset_info.json").is_file()
    assert json.loads((out / "train.json").read_text())[0]["messages"][1]["content"].split("\n")[0] in (
        "safe",
        "unsafe",
    )
