"""The finish worker's follower, and the export's per-sample work done ahead. The follower reads each
kept sample as the build stores it and hands it to the dataset written online (export/online.py);
once that cannot go on (e.g. past its `LIMIT` samples) it fills the memos instead, which keep, for
each kept sample, what the finish would otherwise compute after the last response (issue
13 §6): its Parquet row, its samples.jsonl line (made with the split and image name the sample will
have, both known from its image), the card's per-sample counts, and its query's MinHash sketch for
curation's near-duplicate pass. The finish
then does that only for the samples kept in the run's last moments, and the steps that need the final
set (curation's decisions, the Parquet and JSONL writes, the card).

Nothing here decides anything: each entry is checked against what the finish reads (the sample's stored
JSON, by digest) and a mismatch is computed again, so a finish with a memo writes the same dataset as one
without (tested). Bounded, so a long run's worker stays small: `SAMPLES` samples, ~3 KB each with their
sketch (traced); past that the finish does the rest itself, as it did before. Not the image bytes: held,
they cost the worker their size (+50 MB PSS at 1k images in bench/rss_scale.py) to save reading them
from the page cache (~10 ms per 400)."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmskit.records import Sample

if TYPE_CHECKING:
    from rmskit.export.online import Online
    from rmskit.export.prepare import HeldSample

# 2,000: ~6 MB. 5,000 validated samples with their rows (~60 MB) and the image bytes (capped at 48 MB)
# held the worker at 195 MB PSS at the finish of a 10k-image run (bench/rss_scale.py, 62 MB without them).
SAMPLES = 2_000
# how often the follower looks for newly kept samples (each one left to the finish costs it ~1 ms)
POLL_S = 0.05
BATCH = 128  # samples per read: the follower lets go of the ledger between reads


def digest(raw: str) -> bytes:
    return hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(slots=True)
class Entry:
    digest: bytes  # of the sample's stored JSON
    row: dict[str, Any]  # its Parquet row but the image (~2 KB; the validated `Sample` was ~8.6 KB more)
    # The sample as the dataset pass reads it, made with this split and image name (None: not made,
    # e.g. its image record unreadable); the finish uses it only when curation gives the same ones.
    held: HeldSample | None = None


class ExportMemo:
    def __init__(self, samples: int = SAMPLES) -> None:
        self.max_samples = samples
        self.samples: dict[str, Entry] = {}

    def add_sample(
        self, sid: str, raw: str, split: str | None = None, image: str | None = None
    ) -> Sample | None:
        """Validate and keep a stored sample (not when full, or when it does not validate: the finish
        then meets it as it would have). With `split` and `image` (its dataset path), also its JSONL
        line and counts as the export would write them."""
        if self.full() and sid not in self.samples:
            return None
        from rmskit.curate import apply_review
        from rmskit.export.parquet import base_row
        from rmskit.export.prepare import HeldSample

        made = split is not None and image is not None
        try:
            s = Sample.model_validate(
                {
                    **apply_review(json.loads(raw), None),
                    "split": split if made else None,
                    "image": image or "",
                }
            )
        except ValueError:
            return None
        row = base_row(s)
        self.samples[sid] = Entry(digest(raw), row, HeldSample.of(s, row) if made else None)
        return s

    def full(self) -> bool:
        return len(self.samples) >= self.max_samples

    def take(self, sid: str, raw: str) -> Entry | None:
        """The entry for `sid` if it was made from exactly `raw`, out of the memo: a finish reads each
        sample once, and what its entry held goes back to the export's own work (its peak)."""
        e = self.samples.pop(sid, None)
        return e if e is not None and e.digest == digest(raw) else None


# Set in the finish worker; None elsewhere (no other process holds a memo).
MEMO: ExportMemo | None = None


def enable(samples: int = SAMPLES, sketches: int = SAMPLES) -> ExportMemo:
    """Give this process its memos (the finish worker's)."""
    global MEMO
    from rmskit.curate import minhash

    MEMO = ExportMemo(samples)
    minhash.MEMO = minhash.SketchMemo(sketches)
    return MEMO


def disable() -> None:
    """No memos in this process from now on (a finish run by a thread of the build's process is over)."""
    global MEMO
    from rmskit.curate import minhash

    MEMO = None
    minhash.MEMO = None


class Follower(threading.Thread):
    """Reads each newly kept sample of a run as the build stores it and fills the memos, until `stop`.
    A failure ends the following, never the finish (which then does the work itself)."""

    def __init__(
        self,
        run_dir: Path,
        memo: ExportMemo,
        poll_s: float = POLL_S,
        nice: int = 0,
        online: Online | None = None,
    ) -> None:
        super().__init__(name="rmskit-follow", daemon=True)
        self.run_dir, self.memo, self.poll_s, self.nice = Path(run_dir), memo, poll_s, nice
        # the dataset written as samples come (export/online.py); the memos are filled only once it
        # cannot go on (it then removed what it wrote, and the finish writes from the ledger)
        self.online = online
        self.stop = threading.Event()
        self.seen = 0  # samples read, kept in the memo or not
        self.error: BaseException | None = None

    def run(self) -> None:
        from rmskit import childproc
        from rmskit.export.online import COLUMNS
        from rmskit.ledger import Ledger

        if self.nice:
            childproc.lower_priority(self.nice)  # this thread only, on Linux: the build's cores come first
        try:
            with Ledger(self.run_dir, readonly=True) as led:
                sketchers = _sketchers(led)
                placing = _placing(led)
                last = 0
                while not self.stop.is_set():
                    rows = led.query(
                        f"SELECT {COLUMNS}, image_sha FROM samples WHERE status = 'ok' AND rowid > ?"
                        " ORDER BY rowid LIMIT ?",
                        (last, BATCH),
                    )
                    if rows:
                        last = rows[-1][0]
                        online = self.online if self.online is not None and self.online.usable else None
                        if online is not None:
                            online.take(led, [r[:-1] for r in rows])
                        if online is not None and online.usable:
                            self.seen += len(rows)
                        else:  # the memos from here (the batch it stopped in too)
                            memo_rows = [(r[0], r[1], r[2], r[-1]) for r in rows]
                            self._take(memo_rows, sketchers, _image_names(led, memo_rows), placing)
                    if self.memo.full():
                        return  # a long run: the finish does the rest, as it did before
                    if len(rows) < BATCH:
                        self.stop.wait(self.poll_s)
        except Exception as exc:  # noqa: BLE001 - a hint lost, nothing else
            self.error = exc

    def _take(
        self, rows: list[tuple[Any, ...]], sketchers: list[Any], names: dict[str, str], placing: Any
    ) -> None:
        queries: list[Any] = []
        for _, sid, raw, sha in rows:
            self.seen += 1
            name = names.get(sha) if isinstance(sha, str) else None
            split = placing(sha) if name is not None else None
            s = self.memo.add_sample(sid, raw, split, f"images/{name}" if name is not None else None)
            if s is not None:
                queries.append(s.query)
        for fill in sketchers:
            fill(queries)


def _sketchers(led: Any) -> list[Any]:
    """Curation's near-duplicate sketch fill, at this run's threshold. Not the probe's: the build probes
    a run of up to 2,000 samples itself (pipeline/finish.py `PROBES_HERE`), and past that the memo
    would hold its first 2,000 only."""
    from rmskit.config import BuildConfig
    from rmskit.curate import minhash
    from rmskit.curate.dedup import NUM_PERM, shingles

    memo = minhash.MEMO
    if memo is None:
        return []
    config = led.get_meta("config")
    threshold = (config or {}).get("query_dup_threshold") if isinstance(config, dict) else None
    if threshold is None:
        threshold = BuildConfig.model_fields["query_dup_threshold"].default
    cur = minhash.lsh_params(float(threshold), NUM_PERM)
    # the texts curation reads: `str(query or "")`
    return [lambda qs: memo.fill([str(q or "") for q in qs], shingles, *cur, 1)]


def _placing(led: Any) -> Any:
    """image sha -> its split, with the run's stored seed and test fraction (as the export reads them)."""
    from rmskit.curate.split import split_of
    from rmskit.export.prepare import curate_params

    params = curate_params(led.get_meta("config"))
    seed, fraction = params["seed"], params["test_fraction"]
    return lambda sha: split_of(sha, seed=seed, test_fraction=fraction)


def _image_names(led: Any, rows: list[tuple[Any, ...]]) -> dict[str, str]:
    """The dataset names (`<sha><ext>`) of the rows' images, from their recorded files' names; the finish
    checks them against the files it finds (a moved run directory may name them otherwise)."""
    from rmskit.export.prepare import image_suffix

    shas = sorted({r[3] for r in rows if isinstance(r[3], str)})
    if not shas:
        return {}
    marks = ",".join("?" * len(shas))
    found = led.query(
        f"SELECT sha256, json_extract(data, '$.path') FROM images WHERE sha256 IN ({marks})", tuple(shas)
    )
    return {sha: f"{sha}{image_suffix(path)}" for sha, path in found if isinstance(path, str) and path}
