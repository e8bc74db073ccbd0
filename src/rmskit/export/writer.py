"""write_dataset() and export(): build the output in a temporary sibling folder, then swap it in, so a
crash never leaves a half-written dataset where a complete one was (or was expected)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

import rmskit
from rmskit.export.card import assemble_card, card_parts
from rmskit.export.convo import write_conversations
from rmskit.export.judge import write_judge
from rmskit.export.parquet import ParquetSink
from rmskit.export.prepare import Prepared, prepare

Format = Literal["jsonl", "hf", "llava", "sharegpt", "judge"]
FORMATS: tuple[str, ...] = ("jsonl", "hf", "llava", "sharegpt", "judge")
MARKER = ".rmskit-export.json"  # marks a folder this module wrote (and may replace)


class DatasetSummary(BaseModel):
    path: str
    format: str  # "dataset" for <run>/dataset, else the export format
    samples: int
    splits: dict[str, int] = Field(default_factory=dict)
    images: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    edited: int = 0
    files: list[str] = Field(default_factory=list)


class ExportError(RuntimeError):
    """The export cannot be written (e.g. the target is a folder rmskit did not write)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove leftovers of crashed writes of `name` (temp folders of dead processes)."""
    for leftover in parent.glob(f".{name}.*-*"):
        try:
            pid = int(leftover.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def staging_dir(final: Path) -> tuple[Path, str]:
    """An empty temp folder beside `final` and its tag, for `swap_in`."""
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and any(final.iterdir()) and not (final / MARKER).is_file():
        raise ExportError(f"{final} exists and was not written by rmskit export; refusing to replace it")
    _clean_stale(parent, final.name)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    return tmp, tag


def swap_in(final: Path, tmp: Path, tag: str) -> None:
    """`tmp` replaces `final` in two renames."""
    final = Path(final)
    old = final.parent / f".{final.name}.old-{tag}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; on success it replaces `final` in two renames."""
    tmp, tag = staging_dir(final)
    try:
        yield tmp
        swap_in(final, tmp, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_or_copy(src: str, dst: str) -> None:
    """`dst` as a hard link to `src` when on the same filesystem, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _link_images(prep: Prepared, images_dir: Path) -> None:
    """Content-addressed copies of the kept samples' images: hard links when on the same filesystem."""
    images_dir.mkdir(parents=True, exist_ok=True)
    folder = str(images_dir)
    for sha, src in prep.image_files.items():
        link_or_copy(src, os.path.join(folder, prep.image_name(sha)))  # strs, not Paths: ~4 ms per 400 images


class _Linking(threading.Thread):
    """`_link_images` in a thread of its own; `join` raises what it raised."""

    def __init__(self, prep: Prepared, images_dir: Path) -> None:
        super().__init__(name="rmskit-link-images", daemon=True)
        self._args = (prep, images_dir)
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            _link_images(*self._args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            self._error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._error is not None:
            raise self._error


def _write_jsonl(prep: Prepared, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for s in prep.samples:
            fh.write(s.model_dump_json() + "\n")


def _marker(root: Path, fmt: str, prep: Prepared) -> None:
    (root / MARKER).write_text(
        json.dumps(
            {
                "format": fmt,
                "run_dir": str(prep.run_dir.resolve()),
                "rmskit_version": rmskit.__version__,
                "written_at": time.time(),
            }
        )
        + "\n"
    )


def _files(root: Path) -> list[str]:
    """The dataset's files but its images, which are counted. os.walk, not rglob: a Path per image made
    up part of the ~10 ms that write_dataset lost at 383 samples (147-150 -> 136-143 ms with image_suffix)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        dirnames[:] = [d for d in dirnames if not (rel == "." and d == "images")]
        prefix = "" if rel == "." else f"{rel}/"
        out += [f"{prefix}{f}" for f in filenames if not f.startswith(".")]
    out.sort(key=lambda rel: rel.split("/"))  # as sorted Paths: by parts
    if (root / "images").is_dir():
        out.append(f"images/ ({sum(1 for _ in os.scandir(root / 'images'))} files)")
    return out


def _summary(prep: Prepared, root: Path, fmt: str) -> DatasetSummary:
    st = prep.result.stats
    return DatasetSummary(
        path=str(root),
        format=fmt,
        samples=st.kept,
        splits=st.samples,
        images=len(prep.image_files),
        dropped=st.dropped_by_rule,
        edited=st.edited,
        files=_files(root),
    )


def _card_files(data_files: dict[str, list[str]], with_jsonl: bool) -> list[str]:
    files = ["README.md"]
    files += [f"data/{name}" for names in data_files.values() for name in names]
    if with_jsonl:
        files += ["samples.jsonl", "images/<sha256>.<ext>"]
    return files


# The card's probe numbers, or a call that waits for them (a build's finish computes them while its
# worker exports, and the card is written last).
Probes = dict[str, Any] | Callable[[], dict[str, Any] | None] | None


def _write_hf(prep: Prepared, root: Path, probes: Probes, *, with_jsonl: bool) -> None:
    """Parquet (and the JSONL) in one pass over the kept samples, which also counts the card's digest:
    each pass reads every kept sample back from the ledger and validates it (~25 ms per 400 samples)."""
    parquet = ParquetSink(prep, root / "data")
    # The links in a thread beside the pass: ~12 us of a system call each (4.5 ms per 384 images), with
    # the GIL let go, on a core the pass does not use (a build's finish: once its probes are done).
    linking = _Linking(prep, root / "images") if with_jsonl else None
    try:
        with (
            (root / "samples.jsonl").open("w", encoding="utf-8")
            if with_jsonl
            else contextlib.nullcontext() as fh
        ):
            for s in prep.samples.digesting():
                parquet.add(s)
                if fh is not None:
                    fh.write(s.model_dump_json() + "\n")
        data_files = parquet.close()
    except BaseException:
        if linking is not None:
            with contextlib.suppress(BaseException):  # the pass's error is the one to report
                linking.join()
        raise
    if linking is not None:
        linking.join()
    write_card(prep, root, probes, data_files, with_jsonl=with_jsonl)


def write_card(
    prep: Prepared, root: Path, probes: Probes, data_files: dict[str, list[str]], *, with_jsonl: bool
) -> None:
    """README.md, last: a callable `probes` is waited for here (its None: the run's stored numbers),
    once the rest of the card is rendered (a build's finish: while the build's probes run)."""
    head, tail = card_parts(
        prep, data_files=data_files, files=_card_files(data_files, with_jsonl), exported_at=time.time()
    )
    numbers = probes() if callable(probes) else probes
    if numbers is None and callable(probes):
        numbers = prep.meta.get("probes")
    (root / "README.md").write_text(assemble_card(head, tail, numbers), encoding="utf-8")


def write_dataset(run_dir: Path, *, probes: Probes = None, balance: int | None = None) -> DatasetSummary:
    """Curate the run and (re)write `<run>/dataset/`: samples.jsonl, images/, data/*.parquet, README.md.
    `probes` defaults to the run's stored probe numbers (ledger meta "probes"); a callable is called
    when the card is written, after everything else (and its None means the stored ones too)."""
    prep = prepare(Path(run_dir), balance=balance)
    if probes is None:
        probes = prep.meta.get("probes")
    final = prep.run_dir / "dataset"
    with atomic_dir(final) as tmp:
        _write_hf(prep, tmp, probes, with_jsonl=True)
        _marker(tmp, "dataset", prep)
    return _summary(prep, final, "dataset")


def _export(prep: Prepared, fmt: str, out: Path | None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    final = Path(out) if out is not None else prep.run_dir / "exports" / fmt
    with atomic_dir(final) as tmp:
        if fmt == "jsonl":
            _write_jsonl(prep, tmp / "samples.jsonl")
            _link_images(prep, tmp / "images")
        elif fmt == "hf":
            _write_hf(prep, tmp, prep.meta.get("probes"), with_jsonl=False)
        elif fmt == "judge":
            write_judge(prep.samples, tmp)
            _link_images(prep, tmp / "images")
        else:
            write_conversations(prep.samples, fmt, tmp)  # type: ignore[arg-type]
            _link_images(prep, tmp / "images")
        _marker(tmp, fmt, prep)
    return final


def export(run_dir: Path, fmt: Format, out: Path | None = None, *, balance: int | None = None) -> Path:
    """Write the curated run in `fmt` to `out` (default `<run>/exports/<fmt>`); returns the folder.
    jsonl: samples.jsonl + images/; hf: data/*.parquet + README.md (`datasets.load_dataset(out)`);
    llava / sharegpt: train.json, test.json, images/, dataset_info.json (LLaMA-Factory);
    judge: the same layout holding safety-judge items (guard prompt + verdict), as `score` trains on.
    Review decisions are honoured: rejected samples are left out, edits are used."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _export(prepare(Path(run_dir), balance=balance), fmt, out)


def export_summary(
    run_dir: Path, fmt: Format, out: Path | None = None, *, balance: int | None = None
) -> DatasetSummary:
    """export() plus the counts the CLI prints."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    prep = prepare(Path(run_dir), balance=balance)
    return _summary(prep, _export(prep, fmt, out), fmt)
