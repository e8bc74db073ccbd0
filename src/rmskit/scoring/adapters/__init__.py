"""Benchmark adapters: one Protocol (`base.Adapter`), one small module per benchmark format.

`load_benchmark(name, path)` reads a local release folder/file or an HF dataset id into unified
`BenchSample`s and enforces the missing-image policy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import (
    Adapter,
    AdapterError,
    MissingImagesError,
    is_hf_id,
    strip_hf,
)
from rmskit.scoring.adapters.generic import Generic
from rmskit.scoring.adapters.holisafe import HoliSafe
from rmskit.scoring.adapters.mis import MIS
from rmskit.scoring.adapters.mmsafetybench import MMSafetyBench
from rmskit.scoring.adapters.mssbench import MSSBench
from rmskit.scoring.adapters.rms2 import RMS2
from rmskit.scoring.adapters.rmskit import RmskitDataset
from rmskit.scoring.adapters.siuo import SIUO
from rmskit.scoring.adapters.spavl import SPAVL
from rmskit.scoring.adapters.vlguard import VLGuard
from rmskit.scoring.adapters.vlsbench import VLSBench
from rmskit.scoring.sample import LoadedBenchmark

_ALL: tuple[Any, ...] = (  # each satisfies the Adapter protocol (checked at runtime in tests)
    RmskitDataset(),
    VLGuard(),
    SIUO(),
    VLSBench(),
    MSSBench(),
    HoliSafe(),
    SPAVL(),
    MMSafetyBench(),
    MIS(),
    RMS2(),
    Generic(),
)
ADAPTERS: dict[str, Adapter] = {a.name: a for a in _ALL}
ALIASES = {
    "spa-vl": "spavl",
    "mm-safetybench": "mmsafetybench",
    "mmsb": "mmsafetybench",
    "mss": "mssbench",
    "holisafe-bench": "holisafe",
    "jsonl": "generic",
    "csv": "generic",
}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterError",
    "MissingImagesError",
    "detect_format",
    "get_adapter",
    "load_benchmark",
]


def get_adapter(name: str) -> Adapter:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ADAPTERS:
        raise AdapterError(f"unknown benchmark format {name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[key]


def detect_format(path: str | Path) -> str:
    """Guess the adapter from a local layout (rmskit/VLGuard/SIUO/... markers), else `generic` for a
    table file. Raises AdapterError when nothing matches."""
    root = Path(path)
    for name, adapter in ADAPTERS.items():
        if adapter.detect(root):
            return name
    raise AdapterError(
        f"cannot tell which benchmark {path} is; name its format (one of {', '.join(ADAPTERS)})"
    )


def load_benchmark(
    fmt: str | None,
    path: str | Path,
    *,
    split: str | None = None,
    skip_missing_images: bool = False,
    count_missing_only: bool = False,
    options: Mapping[str, Any] | None = None,
) -> LoadedBenchmark:
    """Read a benchmark. `fmt` None = detect from the layout. Missing image files raise
    MissingImagesError (count + first paths) unless `skip_missing_images` (dropped and counted) or
    `count_missing_only` (kept and counted, for `benchmarks inspect`)."""
    spec = str(path)
    local = Path(spec)
    options = dict(options or {})
    if local.exists():
        adapter = get_adapter(fmt) if fmt else get_adapter(detect_format(local))
        samples = adapter.read_local(local, split, options)
    elif spec.startswith("hf:") or is_hf_id(spec):
        if not fmt:
            raise AdapterError(f"{spec} is not a local path; name the format of this HF dataset")
        adapter = get_adapter(fmt)
        samples = adapter.read_hf(strip_hf(spec), split, options)
    else:
        raise AdapterError(f"{spec}: no such file or folder (and not an HF dataset id)")
    missing_paths: list[str] = []
    kept = []
    for s in samples:
        gone = [p for p in s.images if not Path(p).is_file()]
        if gone:
            missing_paths.extend(gone)
            if skip_missing_images:
                continue
        kept.append(s)
    n_missing = len(samples) - len([s for s in samples if all(Path(p).is_file() for p in s.images)])
    if missing_paths and not (skip_missing_images or count_missing_only):
        raise MissingImagesError(adapter.name, missing_paths)
    return LoadedBenchmark(name=adapter.name, path=spec, samples=kept, missing_images=n_missing)
