"""A build's dataset written as its samples are stored (issue 13 §6: the finish soon after the last
response). The finish worker's follower (export/memo.py) hands each newly kept sample here, in the
order the build stored it; it is curated at once (curation's decisions about a sample depend only on
the samples stored before it: curate/core.py), and a kept one goes straight into the staged dataset:
its samples.jsonl line, its Parquet row (row groups written as they fill), its image's link, the card's
counts. After the last response the finish takes the last few samples, checks that the ledger still
holds exactly what was written, closes the files, writes the card (with the build's probe numbers) and
swaps the folder in: what `write_dataset` would write from the same ledger (tested), without reading
every sample back.

Anything this cannot vouch for ends the online writing and the finish writes the dataset from the
ledger, as before: a sample stored again or gone, review decisions, a changed curation setting, more
than `LIMIT` samples (its LSH buckets are Python dicts: ~1 KB per text), any error."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from rmskit.curate import core
from rmskit.curate.dedup import NUM_PERM, PhashIndex, shingles
from rmskit.curate.minhash import jaccard, lsh_params, sketch
from rmskit.curate.split import split_of
from rmskit.export.parquet import SPLITS, _SplitWriter, arrow_schema, base_row
from rmskit.export.prepare import (
    _COLS,
    KeptSamples,
    Prepared,
    SampleDigest,
    _locate_image,
    _readable_phash,
    curate_params,
    image_suffix,
    run_facts,
)
from rmskit.export.writer import Probes, _marker, link_or_copy, staging_dir, swap_in, write_card
from rmskit.ledger import Ledger
from rmskit.records import Sample

log = logging.getLogger("rmskit.finish")

LIMIT = 2_000  # samples; past it the finish writes the dataset from the ledger
# What the follower reads of each newly stored sample: its rowid, id, JSON and stored time, and the
# fields curation reads, as `prepare` reads them (json_extract: the same values, e.g. a JSON true as 1).
COLUMNS = "rowid, id, data, created, " + ", ".join(f"json_extract(data, '$.{k}')" for k in _COLS[1:])
_KIND, _QUERY = (4 + _COLS[1:].index(k) for k in ("kind", "query"))  # their places in a row


class Broken(Exception):
    """Why the dataset cannot be finished from what was written online."""


class _Queries:
    """Curation's near-duplicate query pass (`curate.dedup.near_duplicate_queries`) one query at a time,
    for one kind: the same LSH buckets (a candidate shares one with a kept text), the same exact Jaccard,
    the same choice (the most similar kept text, the earliest of equals), the same rule for repeats (a
    kept text's copy duplicates its first sample; a dropped text's copy names the best text kept by then)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, NUM_PERM)
        self._number: dict[str, int] = {}  # distinct text -> its number, in the order of its first sample
        self._keys: list[list[tuple[int, int]]] = []  # per text: its (band, key) buckets
        self._tokens: list[np.ndarray] = []  # per text: its token fingerprints
        self._head: list[str] = []  # per text: its first sample
        self._dropped: list[bool] = []
        self._buckets: dict[tuple[int, int], list[int]] = {}  # bucket -> kept texts, ascending

    def sketched(self, texts: list[str]) -> dict[str, tuple[list[tuple[int, int]], np.ndarray]]:
        """The (bucket list, tokens) of the texts not seen yet, in one `sketch` call (one text at a time,
        a sketch cost ~1 ms of numpy calls: 20 ms for a finish's last 20 samples)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._number]
        sk = sketch((shingles(t) for t in new), self.bands, self.rows, seed=1)
        return {
            t: (
                [(j, int(k)) for j, k in enumerate(sk.keys[i])],
                sk.tokens[sk.ends[i] : sk.ends[i + 1]].copy(),
            )
            for i, t in enumerate(new)
        }

    def decide(
        self, sid: str, text: str, sketched: dict[str, tuple[list[tuple[int, int]], np.ndarray]]
    ) -> tuple[str, float] | None:
        """None: kept; else (the kept sample it duplicates, their Jaccard). `sketched` holds the text's
        sketch when it is new (`sketched`)."""
        d = self._number.get(text)
        if d is not None:
            if not self._dropped[d]:
                return self._head[d], 1.0
            best = self._best(d)
            assert best is not None  # the text that dropped it is kept
            return best
        d = self._number[text] = len(self._head)
        keys, tokens = sketched.get(text) or self.sketched([text])[text]
        self._keys.append(keys)
        self._tokens.append(tokens)
        self._head.append(sid)
        best = self._best(d)
        if best is not None and best[1] >= self.threshold:
            self._dropped.append(True)
            return best
        self._dropped.append(False)
        for bucket in self._keys[d]:
            self._buckets.setdefault(bucket, []).append(d)
        return None

    def _best(self, d: int) -> tuple[str, float] | None:
        near = sorted({c for b in self._keys[d] for c in self._buckets.get(b, ())})
        if not near:
            return None
        mine = np.sort(self._tokens[d])
        sims = [jaccard(mine, self._tokens[c]) for c in near]
        best = int(np.argmax(sims))  # the first of equals: the earliest kept
        return self._head[near[best]], sims[best]


class Online:
    """The staged dataset of a run, written sample by sample (`take`) and completed by `finish`."""

    def __init__(self, run_dir: Path, limit: int = LIMIT) -> None:
        self.run_dir = Path(run_dir)
        self.final = self.run_dir / "dataset"
        self.limit = limit
        self.broken: str | None = None  # why `finish` cannot be used
        self.taken: dict[str, tuple[int, float]] = {}  # id -> (rowid, created) of every sample read
        self.last = 0  # the last rowid read
        self._tmp: Path | None = None
        self._tag = ""
        self._params: dict[str, Any] = {}
        self._writers: dict[str, _SplitWriter] = {}
        self._jsonl: Any = None
        self._schema: Any = None
        self._images: dict[str, Any] = {}  # sha -> None (unavailable) or [path, name, phash, verdict]
        self._indexes: dict[int, PhashIndex] = {}
        self._sources: dict[str, str] = {}  # kept image sha -> its source path (a drop's reason names it)
        self._queries: dict[Any, _Queries] = {}
        self.kept: list[dict[str, Any]] = []  # curation's light records, with their split
        self.dropped: list[core.Dropped] = []
        self.image_files: dict[str, str] = {}  # kept image sha -> its file
        self.digest = SampleDigest()

    @property
    def usable(self) -> bool:
        return self.broken is None

    def start(self, led: Ledger) -> None:
        self._params = curate_params(led.get_meta("config"))
        self._tmp, self._tag = staging_dir(self.final)
        (self._tmp / "images").mkdir()
        (self._tmp / "data").mkdir()
        self._jsonl = (self._tmp / "samples.jsonl").open("w", encoding="utf-8")
        self._schema = arrow_schema()

    def take(self, led: Ledger, rows: list[tuple[Any, ...]]) -> None:
        """Newly stored kept samples (`COLUMNS`, in rowid order). A failure makes this unusable."""
        if not self.usable:
            return
        try:
            if self._tmp is None:
                self.start(led)
            # the queries' sketches first, each kind's in one call
            texts: dict[Any, list[str]] = {}
            for row in rows:
                texts.setdefault(row[_KIND], []).append(str(row[_QUERY] or ""))
            sketched = {kind: self._pass(kind).sketched(ts) for kind, ts in texts.items()}
            for row in rows:
                self._take(led, row, sketched[row[_KIND]])
        except Exception as exc:  # noqa: BLE001 - the finish then writes it from the ledger
            self.abandon(f"{type(exc).__name__}: {exc}")

    def _pass(self, kind: Any) -> _Queries:
        """The near-duplicate query pass of one kind (risky with risky, control with control)."""
        queries = self._queries.get(kind)
        if queries is None:
            queries = self._queries[kind] = _Queries(self._params["query_dup_threshold"])
        return queries

    def _take(self, led: Ledger, row: tuple[Any, ...], sketched: dict[str, Any]) -> None:
        rowid, sid, data, created, *light_values = row
        if sid in self.taken:
            raise Broken(f"sample {sid} stored again")
        if len(self.taken) >= self.limit:
            raise Broken(f"more than {self.limit} samples")
        self.taken[sid] = (rowid, created)
        self.last = rowid
        light: dict[str, Any] = dict(zip(_COLS, (sid, *light_values), strict=True))
        sha = light["image_sha256"]
        image = self._image(led, sha) if isinstance(sha, str) else None
        if image is None:
            self.dropped.append(core.unavailable(sid, sha))
            return
        path, name, phash, verdict = image
        if verdict is None:  # its first sample: the image's turn in the near-duplicate pass
            index = self._indexes.setdefault(len(phash.strip()), PhashIndex(self._params["phash_distance"]))
            hit = index.nearest(phash)
            if hit is None:
                index.add(phash, sha)
            verdict = image[3] = hit or ()
        if verdict:
            kept_sha, distance = verdict
            self.dropped.append(core.near_duplicate_image(sid, kept_sha, self._sources[kept_sha], distance))
            return
        dup = self._pass(light["kind"]).decide(sid, str(light["query"] or ""), sketched)
        if dup is not None:
            self.dropped.append(core.near_duplicate_query(sid, dup[0]))
            return
        split = split_of(sha, seed=self._params["seed"], test_fraction=self._params["test_fraction"])
        light["split"] = split
        s = Sample.model_validate(
            {**core.apply_review(json.loads(data), None), "split": split, "image": f"images/{name}"}
        )
        self._write(s, path, name)
        self.kept.append(light)

    def _write(self, s: Sample, path: str, name: str) -> None:
        assert self._tmp is not None and s.split is not None
        if s.image_sha256 not in self.image_files:
            self.image_files[s.image_sha256] = path
            link_or_copy(path, os.path.join(self._tmp, "images", name))
        self._jsonl.write(s.model_dump_json() + "\n")
        if s.split in SPLITS:
            out = self._writers.get(s.split)
            if out is None:
                out = self._writers[s.split] = _SplitWriter(
                    self._tmp / "data", s.split, self._schema, keep_buffer=False
                )
            out.add(base_row(s), path, name)
        self.digest.add(s)

    def _image(self, led: Ledger, sha: str) -> list[Any] | None:
        """[file, dataset name, phash, near-duplicate verdict (None: not yet decided)] of an available
        image, as `prepare` finds it; None when it is not."""
        if sha in self._images:
            return self._images[sha]
        found = led.query(
            "SELECT json_extract(data, '$.phash'), json_extract(data, '$.path'),"
            " json_extract(data, '$.source_path') FROM images WHERE sha256=?",
            (sha,),
        )
        image = None
        if found:
            phash, recorded, source = found[0]
            path = _locate_image(sha, recorded, self.run_dir)
            if path is not None and _readable_phash(phash):
                image = [path, f"{sha}{image_suffix(path)}", phash, None]
                self._sources[sha] = str(source)
        self._images[sha] = image
        return image

    def abandon(self, why: str) -> None:
        """Stop writing online (the finish writes the dataset from the ledger) and remove the staging."""
        if self.broken is None:
            self.broken = why
        for w in self._writers.values():
            with contextlib.suppress(Exception):
                w.writer.close()
        self._writers = {}
        if self._jsonl is not None:
            with contextlib.suppress(Exception):
                self._jsonl.close()
            self._jsonl = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        # what it held for the samples read (its buckets, counts, records), not held on through the run
        self.taken, self.kept, self.dropped, self.image_files = {}, [], [], {}
        self._images, self._indexes, self._sources, self._queries = {}, {}, {}, {}
        self.digest = SampleDigest()

    def finish(self, probes: Probes) -> dict[str, Any] | None:
        """Take the last samples, check the ledger holds exactly what was written, complete and swap
        in the dataset; {"dataset_dir": ...}, or None (and the staging removed) when it cannot."""
        if not self.usable:
            return None
        pool: ThreadPoolExecutor | None = None
        try:
            with Ledger(self.run_dir, readonly=True) as led:
                while rows := led.query(
                    f"SELECT {COLUMNS} FROM samples WHERE status = 'ok' AND rowid > ? ORDER BY rowid",
                    (self.last,),
                ):
                    self.take(led, rows)
                    if not self.usable:
                        return None
                if self._tmp is None:
                    self.start(led)
                # Every row is written: the Parquet files completed in threads, one per split (pyarrow's
                # writes let the GIL go), while the ledger is checked and the card rendered here.
                writers, self._writers = self._writers, {}
                data_files = {split: writers[split].names() for split in SPLITS if split in writers}
                pool = ThreadPoolExecutor(max(1, len(writers)), thread_name_prefix="rmskit-parquet")
                closed = [pool.submit(w.close) for w in writers.values()]
                self._check(led)
                facts = run_facts(led)
            if curate_params(facts.meta.get("config")) != self._params:
                raise Broken("the run's curation settings changed")
            assert self._tmp is not None and self._jsonl is not None
            self._jsonl.close()
            self._jsonl = None
            prep = self._prepared(facts)
            write_card(prep, self._tmp, probes, data_files, with_jsonl=True)
            for done in closed:
                done.result()  # raises what the close raised
            _marker(self._tmp, "dataset", prep)
            swap_in(self.final, self._tmp, self._tag)
            self._tmp = None
            return {"dataset_dir": str(self.final)}
        except Exception as exc:  # noqa: BLE001 - the finish writes it from the ledger
            if pool is not None:
                pool.shutdown()  # the files closed before their folder is removed
            self.abandon(f"{type(exc).__name__}: {exc}")
            return None
        finally:
            if pool is not None:
                pool.shutdown()

    def _check(self, led: Ledger) -> None:
        """The ledger's kept samples are the ones read, each as it was read (a sample stored again has
        a new rowid and time), and no review decision or edit applies."""
        now = {
            sid: (rowid, created)
            for rowid, sid, created in led.stream(
                "SELECT rowid, id, created FROM samples WHERE status = 'ok'"
            )
        }
        if now != self.taken:
            raise Broken("the ledger's kept samples changed since they were written")
        if led.review_state():
            raise Broken("the run has review decisions")

    def _prepared(self, facts: Any) -> Prepared:
        names = {sha: f"{sha}{image_suffix(path)}" for sha, path in self.image_files.items()}
        prep = Prepared(
            run_dir=self.run_dir,
            result=core.curated(len(self.taken), self.kept, self.dropped),
            samples=KeptSamples(
                self.run_dir, {s["id"]: s["split"] for s in self.kept}, {}, names.__getitem__
            ),
            image_files=dict(sorted(self.image_files.items())),
            meta=facts.meta,
            taxonomy=facts.taxonomy,
            usage=facts.usage,
            ingest=facts.ingest,
            ledger_samples=facts.ledger_samples,
            curate_params={**self._params, "balance": None},
        )
        prep.samples.__dict__["digest"] = self.digest  # what its pass over the ledger would count
        return prep
