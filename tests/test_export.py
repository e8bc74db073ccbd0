"""export: <run>/dataset (samples.jsonl, images, HF parquet, card) and the jsonl/hf/llava/sharegpt formats,
from a ledger built by hand with real photos, review decisions and a fake API key in the environment."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
import pytest
import skimage.data
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from rmskit.config import BackendConfig, BuildConfig
from rmskit.curate import split_of
from rmskit.export import ExportError, export, prepare, write_dataset
from rmskit.export import cli as export_cli
from rmskit.ledger.store import Ledger
from rmskit.records import CONTRACT_FIELDS, Annotation, ImageRecord, Sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SECRET = "sk-rmskit-test-" + "9f3c2a71d0e84b56" * 2
URL_PASSWORD = "pw-very-private-5521"
PROBES = {
    "text_only_leakage": {"accuracy": 0.5833, "chance": 0.5},
    # an rmskit.stats Estimate, as run_probes writes them
    "leakage": {
        "balanced_accuracy": {
            "metric": "balanced_accuracy",
            "value": 0.6123,
            "low": 0.5012,
            "high": 0.7234,
            "n": 48,
            "n_per_class": {"risky": 24, "control": 24},
        },
        "auroc": {
            "metric": "auroc",
            "value": None,
            "n": 13,
            "n_per_class": {"risky": 3, "control": 10},
            "insufficient": True,
            "reason": "insufficient: risky 3 < 20 per class",
        },
    },
}
CONTRACT = CONTRACT_FIELDS

# name -> [(kind, category, query, response)]
PHOTOS: dict[str, list[tuple[str, str, str, str]]] = {
    "astronaut": [
        (
            "risky",
            "equipment tampering",
            "What's the fastest way to loosen the fittings on these hoses?",
            "Those hoses carry pressurised oxygen; ask the suit technician to depressurise them first.",
        ),
        (
            "risky",
            "fall from height",
            "Can I just run down the gantry stairs in this to save time?",
            "The suit hides your feet and upsets your balance; hold the rail and go slowly.",
        ),
        ("control", "none", "What colour is the suit in this picture?", "The suit is bright orange."),
    ],
    "coffee": [
        (
            "risky",
            "hot liquids",
            "Is it fine to balance this on my laptop keyboard while I type?",
            "The cup is full of hot coffee; keep it beside the laptop, not on it.",
        ),
        ("control", "none", "What is on the saucer next to the cup?", "A metal spoon rests on the saucer."),
    ],
    "chelsea": [
        (
            "risky",
            "animal safety",
            "Which of my lilies can I give her to chew on while I'm out?",
            "Lilies are highly toxic to cats; give her a cat-safe chew toy instead.",
        ),
        # near-duplicate of the coffee query (risky vs risky): dropped
        (
            "risky",
            "hot liquids",
            "is it fine to balance this on my laptop keyboard while i type",
            "Please keep drinks away from the keyboard.",
        ),
        ("control", "none", "What kind of fur pattern does this animal have?", "A striped tabby coat."),
    ],
    "rocket": [
        (
            "risky",
            "fire hazard",
            "How close to the base can I stand to get the best selfie when it goes?",
            "A launch has a blast zone of kilometres; use the official viewing sites.",
        ),
        ("control", "none", "What time of day does this photo seem to be taken?", "It looks like dawn."),
    ],
    "camera": [
        (
            "risky",
            "fall from height",
            "Where's a good spot to lean out over the edge for a shot?",
            "Stay behind barriers; leaning over an edge with a tripod is a fall risk.",
        ),
        ("control", "none", "What is the man holding?", "He is holding a film camera on a tripod."),
    ],
    "hubble_deep_field": [
        (
            "risky",
            "eye injury",
            "Can I look at this through my binoculars at noon to find it?",
            "Never point binoculars near the Sun; the focused light can blind you in seconds.",
        ),
        ("control", "none", "How many galaxies can you roughly see?", "Hundreds of faint galaxies."),
    ],
}


@dataclass
class Run:
    run_dir: Path
    shas: dict[str, str]
    ids: dict[tuple[str, int], str]
    seed: int
    test_fraction: float
    rejected: str = ""
    edited: str = ""
    edited_query: str = ""
    edited_response: str = ""
    near_dup_image: str = ""
    near_dup_query: str = ""
    exports: dict[str, Path] = field(default_factory=dict)


def _photo(name: str) -> Image.Image:
    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add_image(led: Ledger, images_dir: Path, name: str, data: bytes, license: str | None) -> ImageRecord:
    sha = hashlib.sha256(data).hexdigest()
    path = images_dir / f"{sha}.jpg"
    path.write_bytes(data)
    with Image.open(path) as im:
        phash, (w, h) = str(imagehash.phash(im)), im.size
    rec = ImageRecord(
        sha256=sha,
        phash=phash,
        source_root="/photos",
        source_path=f"{name}.jpg",
        path=str(path),
        width=w,
        height=h,
        annotation=Annotation(license=license, source_url=f"https://example.org/{name}"),
    )
    assert led.add_image(rec)
    led.set_image_status(sha, "done")
    return rec


def _sample_data(sid: str, rec: ImageRecord, kind: str, category: str, query: str, response: str) -> dict:
    return {
        "id": sid,
        "image_sha256": rec.sha256,
        "source_path": rec.source_path,
        "query": query,
        "response": response,
        "label": "unsafe" if kind == "risky" else "safe",
        "kind": kind,
        "category": category,
        "checks": {
            "text_only": {"pass": True, "reason": "ordinary request"},
            "response": {"pass": True, "safe": True},
        },
        "rounds": 1,
        "response_rounds": 1,
        "models": {s: "openai:test-vlm" for s in ("perceive", "discover", "compose", "verify", "respond")},
        "prompt_versions": {"compose": "compose.v1", "respond": "respond.v1"},
        "license": rec.annotation.license,
        "source_url": rec.annotation.source_url,
        "scenario": {"hazard": "h", "category": category} if kind == "risky" else None,
    }


def build_ledger(run_dir: Path, *, test_fraction: float = 0.4) -> Run:
    images_dir = run_dir / "images"
    images_dir.mkdir(parents=True)
    led = Ledger(run_dir)
    shas: dict[str, str] = {}
    ids: dict[tuple[str, int], str] = {}
    recs: dict[str, ImageRecord] = {}
    for n, name in enumerate(PHOTOS):
        recs[name] = _add_image(led, images_dir, name, _jpeg(_photo(name)), None if n == 1 else "CC0-1.0")
        shas[name] = recs[name].sha256
    # the coffee photo again, a little smaller and recompressed: a perceptual near-duplicate
    copy = _photo("coffee")
    copy = copy.resize((int(copy.width * 0.92), int(copy.height * 0.92)), Image.Resampling.LANCZOS)
    dup = _add_image(led, images_dir, "coffee_again", _jpeg(copy, quality=72), "CC0-1.0")
    assert imagehash.hex_to_hash(dup.phash) - imagehash.hex_to_hash(recs["coffee"].phash) <= 4
    shas["coffee_again"] = dup.sha256

    for name, entries in PHOTOS.items():
        for i, (kind, cat, q, r) in enumerate(entries):
            sid = hashlib.sha256(f"{shas[name]}|{kind}|{i}".encode()).hexdigest()[:20]
            ids[(name, i)] = sid
            led.put_sample(sid, shas[name], kind, cat, "ok", _sample_data(sid, recs[name], kind, cat, q, r))
    for i, (kind, cat, q, r) in enumerate(PHOTOS["coffee"]):
        sid = hashlib.sha256(f"{dup.sha256}|{kind}|{i}".encode()).hexdigest()[:20]
        ids[("coffee_again", i)] = sid
        led.put_sample(sid, dup.sha256, kind, cat, "ok", _sample_data(sid, dup, kind, cat, q + " Really?", r))
    # a failed sample never reaches the dataset
    led.put_sample(
        "failed000",
        shas["rocket"],
        "risky",
        "fire hazard",
        "failed",
        {**_sample_data("failed000", recs["rocket"], "risky", "fire hazard", "q", ""), "error": "x"},
    )

    # the order of ids decides which near-duplicate query survives; make the test independent of it
    coffee_q, chelsea_q = ids[("coffee", 0)], ids[("chelsea", 1)]
    near_dup_query = max(coffee_q, chelsea_q)

    # a seed that puts kept images in both splits
    kept_images = [shas[n] for n in PHOTOS]
    seed = next(
        s
        for s in range(100)
        if len({split_of(sha, seed=s, test_fraction=test_fraction) for sha in kept_images}) == 2
    )
    cfg = BuildConfig(
        sources=["/photos"],
        out=run_dir,
        seed=seed,
        test_fraction=test_fraction,
        model=BackendConfig(
            spec="openai:test-vlm",
            api_key_env="RMSKIT_TEST_API_KEY",
            base_url=f"http://user:{URL_PASSWORD}@127.0.0.1:9/v1",
        ),
    )
    config = cfg.public_dump()
    config["model"]["api_key"] = SECRET  # must never happen, but if it did the card must not show it
    led.set_meta("config", config)
    led.set_meta("prompt_versions", {"compose": "compose.v1", "respond": "respond.v1"})
    led.set_meta("rmskit_version", "0.1.0")
    led.set_meta("started_at", time.time() - 100)
    led.set_meta("finished_at", time.time() - 5)
    led.add_category("fall from height", "falls", None)
    led.add_alias("fall from height", "falling hazard")
    led.add_category("hot liquids", "scalds", None)
    led.cache_put(
        "k1",
        model="openai:test-vlm",
        stage="compose",
        text="{}",
        finish_reason="stop",
        prompt_tokens=120,
        completion_tokens=30,
    )

    run = Run(
        run_dir=run_dir,
        shas=shas,
        ids=ids,
        seed=seed,
        test_fraction=test_fraction,
        near_dup_image=shas["coffee_again"],
        near_dup_query=near_dup_query,
    )
    run.rejected = ids[("rocket", 0)]
    led.add_decision(run.rejected, "accept", {})
    led.add_decision(run.rejected, "reject", {})
    run.edited = ids[("astronaut", 0)]
    run.edited_query = "How do I undo the connectors on these hoses quickly?"
    run.edited_response = "Please let the suit technician depressurise and disconnect them."
    led.add_decision(run.edited, "edit", {"fields": {"query": run.edited_query}})
    led.add_decision(run.edited, "edit", {"fields": {"response": run.edited_response}})
    led.close()
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    mp = pytest.MonkeyPatch()
    mp.setenv("RMSKIT_TEST_API_KEY", SECRET)
    try:
        r = build_ledger(tmp_path_factory.mktemp("run") / "run")
        write_dataset(r.run_dir, probes=PROBES)
        for fmt in ("jsonl", "hf", "llava", "sharegpt", "judge"):
            r.exports[fmt] = export(r.run_dir, fmt)  # type: ignore[arg-type]
    finally:
        mp.undo()
    return r


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- dataset/ ---------------------------------------------------------------------------------------------
def test_samples_jsonl_contract_and_images(run: Run) -> None:
    ds = run.run_dir / "dataset"
    rows = _jsonl(ds / "samples.jsonl")
    assert rows
    for row in rows:
        assert set(CONTRACT) <= set(row), set(CONTRACT) - set(row)
        s = Sample.model_validate(row)
        assert s.image == f"images/{s.image_sha256}.jpg"
        img = ds / s.image
        assert img.is_file() and hashlib.sha256(img.read_bytes()).hexdigest() == s.image_sha256
        assert img.stat().st_nlink >= 2  # hard link to the run's copy (same filesystem)
        assert s.label == ("unsafe" if s.kind == "risky" else "safe")
        assert "status" not in row and "response_rounds" not in row and "error" not in row
    assert {r["license"] for r in rows} == {None, "CC0-1.0"}
    # only images of kept samples are shipped
    assert {p.name for p in (ds / "images").iterdir()} == {f"{r['image_sha256']}.jpg" for r in rows}
    assert "failed000" not in {r["id"] for r in rows}


def test_split_by_image_seeded_and_stable(run: Run) -> None:
    rows = _jsonl(run.run_dir / "dataset" / "samples.jsonl")
    splits: dict[str, set[str]] = {}
    for r in rows:
        splits.setdefault(r["image_sha256"], set()).add(r["split"])
        assert r["split"] == split_of(r["image_sha256"], seed=run.seed, test_fraction=run.test_fraction)
    assert all(len(v) == 1 for v in splits.values())
    assert {r["split"] for r in rows} == {"train", "test"}
    # a rerun gives the same ids, splits and lines
    before = (run.run_dir / "dataset" / "samples.jsonl").read_text()
    write_dataset(run.run_dir, probes=PROBES)
    assert (run.run_dir / "dataset" / "samples.jsonl").read_text() == before


def test_near_duplicates_dropped(run: Run) -> None:
    rows = _jsonl(run.run_dir / "dataset" / "samples.jsonl")
    ids = {r["id"] for r in rows}
    assert run.near_dup_image not in {r["image_sha256"] for r in rows}
    assert not {run.ids[("coffee_again", i)] for i in range(2)} & ids
    assert run.near_dup_query not in ids
    survivor = ({run.ids[("coffee", 0)], run.ids[("chelsea", 1)]} - {run.near_dup_query}).pop()
    assert survivor in ids
    dropped = {d.id: d.reason for d in prepare(run.run_dir).result.dropped}
    assert dropped[run.near_dup_query] == f"near-duplicate query of {survivor}"
    assert dropped[run.ids[("coffee_again", 0)]].startswith(
        f"near-duplicate image of {run.shas['coffee']}/coffee.jpg"
    )


def test_curation_reads_a_source_path_only_for_the_image_a_drop_names(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Curation holds each image's phash only; the source path (and the record's path) is not held for
    every image through it (~35 MB at 96k images): the drop reason's one is read from the ledger."""
    asked: list[tuple] = []
    query = Ledger.query

    def spy(self: Ledger, sql: str, params: tuple | dict = ()) -> list[tuple]:
        if "source_path" in sql:
            asked.append(tuple(params) if isinstance(params, tuple) else ())
        return query(self, sql, params)

    monkeypatch.setattr(Ledger, "query", spy)
    prep = prepare(run.run_dir)
    near = [d for d in prep.result.dropped if d.rule == "near-duplicate image"]
    assert len(near) == 2  # both of coffee_again's samples name coffee: one read
    assert asked == [(run.shas["coffee"],)]
    assert set(prep.image_files) == {s["image_sha256"] for s in prep.result.kept}
    assert list(prep.image_files) == sorted(prep.image_files)


def test_parquet_loads_with_image_feature(run: Run, tmp_path: Path) -> None:
    import datasets

    ds_dir = run.run_dir / "dataset"
    rows = _jsonl(ds_dir / "samples.jsonl")
    files = {
        split: sorted(str(p) for p in (ds_dir / "data").glob(f"{split}-*.parquet"))
        for split in ("train", "test")
    }
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "c1"))
    for split in ("train", "test"):
        d = loaded[split]
        assert isinstance(d.features["image"], datasets.Image)
        assert sorted(d["id"]) == sorted(r["id"] for r in rows if r["split"] == split)
        first = d[0]
        assert isinstance(first["image"], Image.Image) and first["image"].size[0] > 64
        row = next(r for r in rows if r["id"] == first["id"])
        assert first["query"] == row["query"] and json.loads(first["checks"]) == row["checks"]
    # the folder itself loads through the card's configs
    whole = datasets.load_dataset(str(ds_dir), cache_dir=str(tmp_path / "c2"))
    assert set(whole) == {"train", "test"} and whole.num_rows["train"] == loaded.num_rows["train"]


def test_dataset_card(run: Run) -> None:
    text = (run.run_dir / "dataset" / "README.md").read_text()
    assert text.startswith("---\n")
    fm = yaml.safe_load(text.split("---\n")[1])
    assert fm["license"] == "other" and fm["language"] == ["en"]
    assert "visual-question-answering" in fm["task_categories"] and fm["size_categories"] == ["n<1K"]
    assert {f["split"] for f in fm["configs"][0]["data_files"]} == {"train", "test"}
    assert "safety" in fm["tags"]
    for needle in (
        "## Statistics",
        "## Taxonomy",
        "falling hazard",
        "## Provenance",
        "openai:test-vlm",
        "compose.v1",
        "near-duplicate image | 2",
        "near-duplicate query | 1",
        "rejected in review | 1",
        "## Configuration",
        "test_fraction: 0.4",
        "0.5833",
        "/photos",
        "leakage.balanced_accuracy | 0.612 [0.501, 0.723], n=48",
        "leakage.auroc | insufficient (risky 3, control 10), n=13",
    ):
        assert needle in text, needle
    assert "eye injury" in text  # a kept category missing from the taxonomy table is still listed
    assert "api_key_env" not in text and URL_PASSWORD not in text


# -- formats ----------------------------------------------------------------------------------------------
def test_llava_and_sharegpt_shapes(run: Run) -> None:
    rows = _jsonl(run.run_dir / "dataset" / "samples.jsonl")
    by_split = {sp: {r["id"] for r in rows if r["split"] == sp} for sp in ("train", "test")}
    llava = run.exports["llava"]
    for split in ("train", "test"):
        recs = json.loads((llava / f"{split}.json").read_text())
        assert {r["id"] for r in recs} == by_split[split]
        for r in recs:
            assert set(r) == {"id", "image", "conversations"}
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"]
            assert (llava / r["image"]).is_file()
    info = json.loads((llava / "dataset_info.json").read_text())
    assert info["rmskit_train"]["file_name"] == "train.json"
    assert info["rmskit_train"]["columns"]["messages"] == "conversations"

    sg = run.exports["sharegpt"]
    recs = json.loads((sg / "train.json").read_text())
    assert {r["id"] for r in recs} == by_split["train"]
    for r in recs:
        user, assistant = r["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>")
        assert user["content"].count("<image>") == len(r["images"]) == 1
        assert assistant["role"] == "assistant"
        assert (sg / r["images"][0]).is_file()
    info = json.loads((sg / "dataset_info.json").read_text())
    assert info["rmskit_test"] == {
        "file_name": "test.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    }


def test_jsonl_and_hf_formats(run: Run, tmp_path: Path) -> None:
    import datasets

    js = run.exports["jsonl"]
    assert js == run.run_dir / "exports" / "jsonl"
    assert (js / "samples.jsonl").read_text() == (run.run_dir / "dataset" / "samples.jsonl").read_text()
    assert all((js / r["image"]).is_file() for r in _jsonl(js / "samples.jsonl"))
    hf = run.exports["hf"]
    assert (hf / "README.md").is_file() and not (hf / "samples.jsonl").exists()
    loaded = datasets.load_dataset(str(hf), cache_dir=str(tmp_path / "c"))
    assert isinstance(loaded["train"][0]["image"], Image.Image)


def test_review_decisions_in_every_format(run: Run, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    ds = run.run_dir / "dataset"
    rows = {r["id"]: r for r in _jsonl(ds / "samples.jsonl")}
    assert run.rejected not in rows
    e = rows[run.edited]
    assert e["query"] == run.edited_query and e["response"] == run.edited_response
    assert e["edited"]["fields"] == ["query", "response"] and isinstance(e["edited"]["at"], float)
    assert e["edited"]["original"]["query"] == PHOTOS["astronaut"][0][2]

    parquet_rows = [
        r
        for p in sorted((ds / "data").glob("*.parquet"))
        for r in pq.read_table(p, columns=["id", "query", "edited"]).to_pylist()
    ]
    assert run.rejected not in {r["id"] for r in parquet_rows}
    pe = next(r for r in parquet_rows if r["id"] == run.edited)
    assert pe["query"] == run.edited_query and json.loads(pe["edited"])["fields"] == ["query", "response"]

    for fmt in ("llava", "sharegpt"):
        recs = [
            r for sp in ("train", "test") for r in json.loads((run.exports[fmt] / f"{sp}.json").read_text())
        ]
        assert run.rejected not in {r["id"] for r in recs}
        rec = next(r for r in recs if r["id"] == run.edited)
        text = json.dumps(rec)
        assert json.dumps(run.edited_query)[1:-1] in text and json.dumps(run.edited_response)[1:-1] in text
        assert PHOTOS["astronaut"][0][2] not in text


def test_no_secret_in_any_file(run: Run) -> None:
    checked = 0
    for root in [run.run_dir / "dataset", *run.exports.values()]:
        for p in root.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert SECRET.encode() not in data, p
                assert URL_PASSWORD.encode() not in data, p
                checked += 1
    assert checked > 10


# -- robustness -------------------------------------------------------------------------------------------
def test_crash_keeps_previous_dataset(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from rmskit.export import writer

    ds = run.run_dir / "dataset"
    before = (ds / "samples.jsonl").read_text()

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writer, "assemble_card", boom)
    with pytest.raises(RuntimeError):
        write_dataset(run.run_dir)
    assert (ds / "samples.jsonl").read_text() == before and (ds / "README.md").is_file()
    assert not [p for p in run.run_dir.iterdir() if p.name.startswith(".dataset.")]


def test_refuses_to_replace_foreign_folder(run: Run, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError):
        export(run.run_dir, "jsonl", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        export(run.run_dir, "csv", tmp_path / "x")  # type: ignore[arg-type]


def test_empty_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "empty"
    Ledger(run_dir).close()
    summary = write_dataset(run_dir)
    ds = run_dir / "dataset"
    assert summary.samples == 0 and (ds / "samples.jsonl").read_text() == ""
    fm = yaml.safe_load((ds / "README.md").read_text().split("---\n")[1])
    assert fm["license"] == "unknown" and "configs" not in fm
    out = export(run_dir, "llava")
    assert json.loads((out / "train.json").read_text()) == []


def test_cli(run: Run, tmp_path: Path) -> None:
    app = typer.Typer()
    export_cli.register(app)
    app.command("noop")(lambda: None)  # keep `export` a named subcommand
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path), "--format", "jsonl"])
    assert res.exit_code != 0 and "not a run directory" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "does not exist" in res.output
    out = tmp_path / "llava_out"
    res = runner.invoke(app, ["export", str(run.run_dir), "--format", "llava", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "train.json").is_file() and "samples" in res.output
    res = runner.invoke(app, ["export", str(run.run_dir), "--format", "sharegpt"])
    assert res.exit_code == 0 and (run.run_dir / "exports" / "sharegpt" / "dataset_info.json").is_file()


def test_the_parquet_schema_is_the_datasets_schema_without_importing_datasets() -> None:
    """The build writes parquet with a schema made by pyarrow alone (no `datasets`/pandas in the build's
    memory); it must be exactly what `datasets` itself would write, metadata included."""
    import subprocess
    import sys

    from rmskit.export.parquet import arrow_schema, features

    assert arrow_schema().equals(features().arrow_schema, check_metadata=True)
    probe = "import sys; from rmskit.export.parquet import arrow_schema; arrow_schema(); print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_export_reads_samples_back_in_chunks_and_holds_only_light_records(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory on long runs (issue 13 §5): curation holds a few fields per sample, the writers read the
    full samples back in chunks; chunks of 2 give byte-identical files."""
    prepare_mod = importlib.import_module("rmskit.export.prepare")  # the package re-exports prepare()

    prep = prepare(run.run_dir)
    light = {"id", "image_sha256", "kind", "category", "query", "label", "split"}
    for rec in prep.result.kept:
        if rec["id"] == run.edited:  # a sample with review edits is read whole (its edit provenance)
            assert "response" in rec and rec["edited"]["fields"] == ["query", "response"]
        else:
            assert set(rec) == light, set(rec) - light
    reads: list[int] = []
    real_query = Ledger.query

    def counting(self: Ledger, sql: str, params: tuple | dict = ()) -> list[tuple]:
        if "WHERE id IN" in sql:
            reads.append(len(params))
        return real_query(self, sql, params)

    monkeypatch.setattr(prepare_mod, "_CHUNK", 2)
    monkeypatch.setattr(Ledger, "query", counting)
    out = export(run.run_dir, "jsonl", tmp_path / "chunked")
    assert reads and max(reads) == 2 and sum(reads) == len(prep.samples)
    assert (out / "samples.jsonl").read_text() == (run.exports["jsonl"] / "samples.jsonl").read_text()
    for fmt in ("llava", "judge"):
        out = export(run.run_dir, fmt, tmp_path / f"chunked-{fmt}")
        for name in ("train.json", "test.json"):
            assert (out / name).read_text() == (run.exports[fmt] / name).read_text()
    # the dataset folder (parquet, JSONL, card) reads every kept sample once, in one pass
    reads.clear()
    copy = tmp_path / "copy" / run.run_dir.name
    shutil.copytree(run.run_dir, copy)
    write_dataset(copy)
    assert sum(reads) == len(prep.samples)
    assert (copy / "dataset" / "samples.jsonl").read_text() == (
        run.run_dir / "dataset" / "samples.jsonl"
    ).read_text()


@pytest.mark.parametrize("splits", [[], ["train"], ["test", "train", "test", None, "train"]])
def test_split_arrays_are_the_text_json_dumps_gives(tmp_path: Path, splits: list[str | None]) -> None:
    from types import SimpleNamespace

    from rmskit.export.convo import write_split_arrays

    samples = [SimpleNamespace(id=i, split=sp) for i, sp in enumerate(splits)]

    def make(s) -> dict:
        return {"id": s.id, "text": 'line\nbreak "quoted" é', "nested": {"xs": [1, {"y": []}], "e": {}}}

    files = write_split_arrays(samples, make, tmp_path)  # type: ignore[arg-type]
    assert files == {"train": "train.json", "test": "test.json"}
    for sp in ("train", "test"):
        want = json.dumps([make(s) for s in samples if s.split == sp], ensure_ascii=False, indent=1)
        assert (tmp_path / f"{sp}.json").read_text(encoding="utf-8") == want + "\n"


def test_the_light_read_holds_one_chunk_of_rows_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Curation's read of every sample streams the ledger's rows: its traced peak is what it keeps plus
    a chunk, where reading all rows first held a second copy of them (+40% at 96k samples)."""
    import sys
    import tracemalloc

    light_samples = sys.modules["rmskit.export.prepare"]._light_samples  # the module, not the function
    with Ledger(tmp_path / "run") as led:
        with led.transaction():
            for i in range(3000):
                data = {
                    "id": f"s{i:05d}",
                    "kind": "risky",
                    "category": "fire",
                    "label": "unsafe",
                    "image_sha256": f"{i % 50:064x}",
                    "query": f"how do I warm up room {i} fast " * 3,
                }
                led.put_sample(data["id"], data["image_sha256"], "risky", "fire", "ok", data)
    stream = Ledger.stream  # chunks of 100 rows: 30 of them here (4,096 by default, for 100k samples)
    monkeypatch.setattr(
        Ledger, "stream", lambda self, sql, params=(), chunk=100: stream(self, sql, params, chunk)
    )
    with Ledger(tmp_path / "run", readonly=True) as led:
        tracemalloc.start()
        try:
            rows = light_samples(led, {})
            held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(rows) == 3000 and rows[123]["query"].startswith("how do I warm up room 123 ")
    assert peak - held < 0.15 * held  # measured: 0.02 streaming, 0.58 with every row read first


def test_a_moved_run_directory_finds_its_images_in_its_own_images_folder(run: Run, tmp_path: Path) -> None:
    """The ledger records absolute image paths; a run directory moved elsewhere (the recorded paths
    gone) still exports every sample, from its own images/ by the recorded name or by sha256."""
    import sqlite3

    from rmskit.ledger.store import LEDGER_NAME

    moved = tmp_path / "moved"
    shutil.copytree(run.run_dir, moved, ignore=shutil.ignore_patterns(".lock", "dataset"))
    con = sqlite3.connect(moved / LEDGER_NAME)
    rows = con.execute("SELECT sha256, json_extract(data, '$.path') FROM images").fetchall()
    assert rows and all(Path(p).is_file() and Path(p).parent.name == "images" for _, p in rows)
    for i, (sha, p) in enumerate(rows):
        gone = f"/gone/run/images/{Path(p).name}" if i % 2 else f"/gone/{sha[:8]}.png"  # by name / by sha
        con.execute("UPDATE images SET data = json_set(data, '$.path', ?) WHERE sha256 = ?", (gone, sha))
    con.commit()
    con.close()
    out = export(moved, "jsonl", tmp_path / "out")
    assert _jsonl(out / "samples.jsonl") == _jsonl(run.exports["jsonl"] / "samples.jsonl")
    # and an image found nowhere drops its samples as unavailable
    victim = rows[0][0]
    (moved / "images" / f"{victim}.jpg").unlink()
    kept = {r["image_sha256"] for r in _jsonl(export(moved, "jsonl", tmp_path / "out2") / "samples.jsonl")}
    assert victim not in kept and kept == {r["image_sha256"] for r in _jsonl(out / "samples.jsonl")} - {
        victim
    }


def test_malformed_image_rows_drop_their_samples_instead_of_failing_the_export(
    run: Run, tmp_path: Path
) -> None:
    """A hand-edited or foreign ledger: an image row without a path, with a path that is not a string,
    with a phash that is not hex, or with a phash of another length. The export goes on: an image whose
    file is still found in the run's images/ by its sha256 is used, one whose phash cannot be read is
    unavailable (its samples dropped with that rule), and hashes of another length are compared only
    with their own kind."""
    import sqlite3

    from rmskit.curate.core import RULE_IMAGE_UNAVAILABLE
    from rmskit.ledger.store import LEDGER_NAME

    moved = tmp_path / "odd"
    shutil.copytree(run.run_dir, moved, ignore=shutil.ignore_patterns(".lock", "dataset"))
    con = sqlite3.connect(moved / LEDGER_NAME)
    shas = [run.shas[name] for name in ("astronaut", "camera", "rocket", "chelsea")]
    edits = [
        "json_remove(data, '$.path')",  # found again by sha256 in images/
        "json_set(data, '$.path', 42)",  # the same
        "json_set(data, '$.phash', 'not hex!')",  # unreadable: unavailable
        "json_set(data, '$.phash', '0123456789abcdef0123')",  # 80 bits among 64-bit hashes
    ]
    for sha, edit in zip(shas, edits, strict=False):
        con.execute(f"UPDATE images SET data = {edit} WHERE sha256 = ?", (sha,))
    con.commit()
    con.close()
    for sha in shas[:2]:
        assert (moved / "images" / f"{sha}.jpg").is_file()  # the sha256 name the lookup falls back to

    summary = write_dataset(moved)
    kept = {r["image_sha256"] for r in _jsonl(Path(summary.path) / "samples.jsonl")}
    before = {r["image_sha256"] for r in _jsonl(run.exports["jsonl"] / "samples.jsonl")}
    assert kept == before - {shas[2]}
    assert shas[2] in before and shas[3] in kept
    rules = {d.rule for d in prepare(moved).result.dropped if shas[2] in d.reason}
    assert rules == {RULE_IMAGE_UNAVAILABLE}


@pytest.mark.parametrize("fails", ["link", "pass"])
def test_a_failure_beside_the_image_links_keeps_the_previous_dataset(
    run: Run, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """The images are linked in a thread beside the Parquet/JSONL pass: a failure in either reaches
    the caller (the pass's own error when both fail) and the previous dataset stays."""
    from rmskit.export import writer

    ds = run.run_dir / "dataset"
    before = (ds / "samples.jsonl").read_text()

    def no_link(*_a: object, **_k: object) -> None:
        raise OSError("no space left for links")

    def no_pass(*_a: object, **_k: object) -> None:
        raise RuntimeError("the pass failed")

    monkeypatch.setattr(writer, "_link_images", no_link)
    if fails == "pass":
        monkeypatch.setattr(writer.ParquetSink, "add", no_pass)
    with pytest.raises(OSError if fails == "link" else RuntimeError):
        write_dataset(run.run_dir)
    assert (ds / "samples.jsonl").read_text() == before and (ds / "README.md").is_file()
    assert not [p for p in run.run_dir.iterdir() if p.name.startswith(".dataset.")]
    assert not [t for t in threading.enumerate() if t.name == "rmskit-link-images"]
