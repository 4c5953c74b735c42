"""FAISS indexes over a layer's pooled (mean) vectors: exact search with a bounded int8 pre-scan, and
approximate IVF/HNSW search with an exact re-rank.

Every index folder holds ``index.faiss``: a ``faiss.IndexIDMap2`` keyed by ``row_id`` (over an
``IndexFlatIP`` for the exact kind, an ``IndexIVFScalarQuantizer`` or ``IndexHNSWSQ`` otherwise),
readable with ``faiss.read_index`` and no project code. Cosine is inner product on L2-normalised
vectors.

Exact search without scanning 2 GB of float32 per query: the flat folder also holds an 8-bit
per-dimension quantisation of the vectors (``prescan-*.faiss``: ``QT_8bit_uniform`` codes, with
each dimension's affine map ``x ~ vmin_j + s_j t(c)`` folded into the query, ``t`` being FAISS's own
decoding table) and, per dimension, the largest reconstruction error
``E_j = max_i |x_ij - vmin_j - s_j t(c_ij)|``. For a query q the estimate
``q.vmin + sum_j (q_j s_j) t(c_ij)`` differs from ``q.x_i`` by at most ``sum_j |q_j| E_j`` plus a
float rounding margin. The pre-scan returns the top candidates by estimate (one thread per
prescan shard); they are re-scored exactly in float64, and the answer is accepted only when every
vector left out has an upper bound below the k-th exact score; otherwise the candidate list grows,
and in the worst case the search falls back to a full exact scan. The result is always exact.
FAISS's estimates are checked against numpy when the pre-scan is built; if they disagree the
pre-scan is left out (``prescan_disabled`` in the manifest) and searches scan everything.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.cache import atomic_write_json, read_manifest
from pipeline.errors import PipelineError

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("ip", "cosine")
INDEX_FILE = "index.faiss"
PRESCAN_NPZ = "prescan.npz"
BLOCK = 65536
_U32 = 2.0 ** -24
_U64 = 2.0 ** -53


def index_dirname(kind: str, metric: str) -> str:
    return f"index-{kind}-{metric}"


def check_kind_metric(kind: str, metric: str) -> None:
    if kind not in KINDS:
        raise PipelineError(f"unknown index kind {kind!r}: use one of {', '.join(KINDS)}.")
    if metric not in METRICS:
        raise PipelineError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}.")


def prepare_query(vector: Any, channels: int, metric: str) -> np.ndarray:
    """The query as float64 (C,), L2-normalised for cosine; clear errors for bad shapes or values."""
    q = np.asarray(vector, dtype=np.float64).reshape(-1)
    if q.shape[0] != channels:
        raise PipelineError(f"the query vector has {q.shape[0]} values but the layer has {channels} channels.")
    if not np.all(np.isfinite(q)):
        raise PipelineError("the query vector contains NaN or infinite values.")
    if metric == "cosine":
        norm = float(np.linalg.norm(q))
        if norm == 0.0:
            raise PipelineError("the query vector is all zeros: cosine similarity is undefined for it.")
        q = q / norm
    return q


def _normalise_rows(x: np.ndarray) -> None:
    """L2-normalise rows in place (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)


def _view(ptr: Any, count: int, dtype: type) -> np.ndarray:
    """A numpy view of ``count`` elements of a FAISS byte buffer."""
    raw = faiss.rev_swig_ptr(ptr, count * np.dtype(dtype).itemsize)
    return np.frombuffer(raw, dtype=np.uint8).view(dtype)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run FAISS calls of this thread on one OpenMP thread: a single query gains nothing from a
    parallel region, and on a busy machine its barrier waits for a descheduled thread (milliseconds)."""
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(n)


def build_flat(final: Path, blocks: Iterable[tuple[np.ndarray, np.ndarray]], n: int, channels: int,
               metric: str, manifest: dict[str, Any], prescan_min_rows: int = 20000,
               prescan_shards: int | None = None) -> dict[str, Any]:
    """Build the exact index of ``n`` vectors from ``blocks`` of (row_ids, (m, C) float32).

    The vectors are written straight into the ``IndexFlatIP`` buffer (no second copy); the 8-bit
    pre-scan is added when ``n >= prescan_min_rows``, split into ``prescan_shards`` files searched
    in parallel (default: FAISS's thread count).
    """
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(channels)
    index = faiss.IndexIDMap2(flat)          # must wrap the index while it is empty
    flat.codes.resize(n * channels * 4)
    xb = _view(flat.codes.data(), n * channels, np.float32).reshape(n, channels)
    rows = np.empty(n, np.int64)
    at = 0
    for block_rows, block in blocks:
        m = len(block_rows)
        xb[at:at + m] = block
        if metric == "cosine":
            _normalise_rows(xb[at:at + m])
        rows[at:at + m] = block_rows
        at += m
    if at != n:
        raise RuntimeError(f"expected {n} vectors, got {at}")
    flat.ntotal = n
    faiss.copy_array_to_vector(rows, index.id_map)
    index.ntotal = n
    index.construct_rev_map()
    tmp = _tmp_dir(final)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    info: dict[str, Any] = {"n": n, "channels": channels, "kind": "flat", "metric": metric, "prescan": 0}
    if n >= max(prescan_min_rows, 1):
        shards = max(1, min(prescan_shards or faiss.omp_get_max_threads(), n))
        info.update(_build_prescan(tmp, xb, shards))
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(tmp / "manifest.json", {**manifest, **info})
    _replace_dir(tmp, final)
    return info


def _decode_table(c: int) -> np.ndarray:
    """FAISS's decoded value of each 8-bit code (0..255) for a uniform quantiser trained on [0, 255]."""
    sq = _uniform_sq(c)
    codes = np.repeat(np.arange(256, dtype=np.uint8)[:, None], c, 1)
    return sq.sa_decode(codes)[:, 0].astype(np.float64)


def _uniform_sq(c: int) -> faiss.IndexScalarQuantizer:
    sq = faiss.IndexScalarQuantizer(c, faiss.ScalarQuantizer.QT_8bit_uniform, faiss.METRIC_INNER_PRODUCT)
    sq.train(np.array([[0.0] * c, [255.0] * c], np.float32))
    return sq


def _build_prescan(folder: Path, xb: np.ndarray, shards: int) -> dict[str, Any]:
    """Write ``prescan-<s>.faiss`` (8-bit codes of contiguous position ranges) and ``prescan.npz``.

    ``QT_8bit_uniform`` codes with the per-dimension affine map folded into the query: the vector is
    reconstructed as ``vmin + scale * table[code]`` (``table`` = FAISS's own decoding). ``QT_8bit_direct``
    is not used: for d % 32 == 0 FAISS computes it in the byte domain, casting the query to bytes.
    Returns {"prescan": shards} or, when FAISS's estimates fail a self-check, {"prescan": 0, ...}.
    """
    n, c = xb.shape
    table = _decode_table(c)
    lo = np.full(c, np.inf)
    hi = np.full(c, -np.inf)
    for s in range(0, n, BLOCK):
        lo = np.minimum(lo, xb[s:s + BLOCK].min(0))
        hi = np.maximum(hi, xb[s:s + BLOCK].max(0))
    step = table[1] - table[0]
    if not np.allclose(np.diff(table), step, rtol=1e-5):
        return {"prescan": 0, "prescan_disabled": "FAISS's 8-bit uniform decoding is not affine"}
    scale = (hi - lo) / (table[255] - table[0])
    scale[scale == 0] = 1.0
    vmin = lo - scale * table[0]
    err = np.zeros(c)
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    indexes = []
    for s in range(shards):
        a, b = int(bounds[s]), int(bounds[s + 1])
        sq = _uniform_sq(c)
        sq.codes.resize((b - a) * c)
        codes = _view(sq.codes.data(), (b - a) * c, np.uint8).reshape(b - a, c)
        for at in range(a, b, BLOCK):
            x = xb[at:min(at + BLOCK, b)].astype(np.float64)
            q = np.clip(np.rint(((x - vmin) / scale - table[0]) / step), 0, 255).astype(np.uint8)
            err = np.maximum(err, np.abs(x - (vmin + scale * table[q])).max(0))
            codes[at - a:at - a + len(x)] = q
        sq.ntotal = b - a
        indexes.append(sq)
    arrays = {"vmin": vmin, "scale": scale, "err": err, "table": table,
              "maxabs": np.maximum(np.abs(lo), np.abs(hi)), "bounds": bounds}
    problem = _self_check(indexes, arrays)
    if problem:
        return {"prescan": 0, "prescan_disabled": problem}
    for s, sq in enumerate(indexes):
        faiss.write_index(sq, str(folder / f"prescan-{s}.faiss"))
    np.savez(folder / PRESCAN_NPZ, **arrays)
    return {"prescan": shards}


def _prescan_margin(qs: np.ndarray, q: np.ndarray, arrays: dict[str, np.ndarray]) -> float:
    """Bound on the float rounding of FAISS's float32 estimate and of the float64 re-scoring."""
    d = len(q)
    gamma = (d + 1) * _U32 / (1 - (d + 1) * _U32)
    tmax = float(np.abs(arrays["table"]).max())
    return 1.01 * ((gamma + 2 * _U32) * tmax * float(np.abs(qs).sum())
                   + 3 * (d + 2) * _U64 * float(np.abs(q) @ (arrays["maxabs"] + np.abs(arrays["vmin"]))))


def _self_check(indexes: list[faiss.Index], arrays: dict[str, np.ndarray]) -> str:
    """Check FAISS's estimates against numpy on sampled codes: the exactness proof relies on them."""
    rng = np.random.default_rng(5)
    c = len(arrays["vmin"])
    for sq in indexes:
        m = min(sq.ntotal, 512)
        ids = np.sort(rng.choice(sq.ntotal, m, replace=False)).astype(np.int64)
        codes = _view(sq.codes.data(), sq.ntotal * c, np.uint8).reshape(sq.ntotal, c)[ids]
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
        for _ in range(3):
            q = rng.standard_normal(c)
            qs = q * arrays["scale"]
            dist, got = sq.search(qs.astype(np.float32)[None], m, params=params)
            want = arrays["table"][codes] @ qs
            order = np.searchsorted(ids, got[0])
            if not np.all(np.abs(dist[0] - want[order]) <= _prescan_margin(qs, q, arrays) + 1e-12):
                return "FAISS's 8-bit estimates disagree with numpy on this machine"
    return ""


def _read_ahead(path: Path) -> mmap.mmap | None:
    """Ask the kernel to read a file into the page cache in the background (MADV_WILLNEED).

    Memory-mapped indexes are paged in on first touch; without this the first queries after
    opening a store pay for disk reads of random vectors. Returns the mapping (keep it alive).
    """
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm.madvise(mmap.MADV_WILLNEED)
        return mm
    except (OSError, ValueError, AttributeError):
        return None


class FlatIndex:
    """An exact index loaded for queries (memory-mapped and read ahead in the background)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = read_manifest(folder) or {}
        self.metric = self.manifest["metric"]
        self._read_ahead = [_read_ahead(p) for p in sorted(folder.glob("*.faiss"))]
        self.index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC)
        inner = faiss.downcast_index(self.index.index)
        self.n, self.channels = inner.ntotal, inner.d
        self.vectors = _view(inner.codes.data(), self.n * self.channels, np.float32).reshape(self.n, self.channels)
        self.rows = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        self._by_row = np.argsort(self.rows, kind="stable")
        self._sorted_rows = self.rows[self._by_row]
        self._prescan: list[faiss.Index] = []
        self._pool: ThreadPoolExecutor | None = None
        if self.manifest.get("prescan"):
            with np.load(folder / PRESCAN_NPZ) as z:
                self._arrays = {k: z[k] for k in z.files}
            self.bounds = self._arrays["bounds"]
            self._prescan = [faiss.read_index(str(folder / f"prescan-{s}.faiss"), faiss.IO_FLAG_MMAP_IFC)
                             for s in range(int(self.manifest["prescan"]))]

    def positions(self, row_ids: np.ndarray) -> np.ndarray:
        """Positions of ``row_ids`` in the index (-1 where absent)."""
        row_ids = np.asarray(row_ids, np.int64)
        if self.n == 0:
            return np.full(row_ids.shape, -1, np.int64)
        at = np.searchsorted(self._sorted_rows, row_ids).clip(max=self.n - 1)
        return np.where(self._sorted_rows[at] == row_ids, self._by_row[at], -1)

    def rescore(self, pos: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Exact float64 scores of the vectors at ``pos``."""
        return self.vectors[pos].astype(np.float64) @ q

    def best(self, pos: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best by (score desc, row_id asc)."""
        order = np.lexsort((self.rows[pos], -scores))[:k]
        return pos[order], scores[order]

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` positions and float64 scores for a prepared query ``q``."""
        k = min(k, self.n)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0)
        if not self._prescan or self.n <= 4 * (k + 64):
            return self.brute(q, k)
        qs = q * self._arrays["scale"]
        qs32 = qs.astype(np.float32)[None]
        slack = float(np.abs(q) @ self._arrays["err"]) + _prescan_margin(qs, q, self._arrays)
        const = float(q @ self._arrays["vmin"])
        shard_n = self.n // len(self._prescan)
        kp = max(2 * k + 64, shard_n // 1000 + k)     # enough candidates for one pass in most queries
        while kp * len(self._prescan) < self.n // 2:
            pos, est, thresh = self._prescan_search(qs32, kp)
            top, top_scores = self._rerank(pos, est + const, slack, q, k)
            if thresh == -math.inf or thresh + const + slack < top_scores[-1]:
                return top, top_scores
            kp *= 8
        return self.brute(q, k)

    def _rerank(self, pos: np.ndarray, est: np.ndarray, slack: float, q: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of the candidates, scoring only those whose upper bound can still make it."""
        order = np.argsort(-est, kind="stable")
        pos, est = pos[order], est[order]
        head = min(len(pos), 4 * k)
        top, scores = self.best(pos[:head], self.rescore(pos[:head], q), k)
        rest = np.flatnonzero(est[head:] + slack >= scores[-1]) + head
        if len(rest):
            cand = np.concatenate([top, pos[rest]])
            top, scores = self.best(cand, np.concatenate([scores, self.rescore(pos[rest], q)]), k)
        return top, scores

    def _prescan_search(self, qs32: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Each prescan shard's top-``kp`` positions and estimates (without the constant term), and
        the largest estimate left out."""
        def one(s: int) -> tuple[np.ndarray, np.ndarray]:
            dist, ids = self._prescan[s].search(qs32, kp)
            return dist[0], ids[0]
        if len(self._prescan) == 1:
            with single_thread():
                results = [one(0)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self._prescan), initializer=faiss.omp_set_num_threads,
                                                initargs=(1,))
            results = list(self._pool.map(one, range(len(self._prescan))))
        pos, est, thresh = [], [], -math.inf
        for s, (dist, ids) in enumerate(results):
            ok = ids >= 0
            pos.append(ids[ok] + self.bounds[s])
            est.append(dist[ok].astype(np.float64))
            if ok.all() and self.bounds[s + 1] - self.bounds[s] > kp:
                thresh = max(thresh, float(dist[-1]))
        return np.concatenate(pos), np.concatenate(est), thresh

    def brute(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scan of every vector in float64 (small indexes, or the pre-scan's last resort)."""
        scores = np.concatenate([self.rescore(np.arange(s, min(s + BLOCK, self.n)), q)
                                 for s in range(0, self.n, BLOCK)]) if self.n else np.empty(0)
        if k < self.n:
            cand = np.argpartition(-scores, k - 1)[:k]
            cand = np.flatnonzero(scores >= scores[cand].min())
        else:
            cand = np.arange(self.n)
        return self.best(cand, scores[cand], k)


def build_approx(final: Path, flat: FlatIndex, kind: str, manifest: dict[str, Any],
                 params: dict[str, Any], directions: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Build an IVF (``nlist``, default sqrt(N)) or HNSW (``M``=32, ``ef_construction``=80) index
    with 8-bit codes over the flat index's vectors, then pick the smallest ``nprobe``/``ef_search``
    whose recall@10 against exact search reaches ``target_recall`` (default 0.99) on sampled queries
    (stored vectors, and ``directions`` such as class-mean differences when given), and keep twice
    that as a margin.
    """
    allowed = {"train_size", "refine", "target_recall"} | ({"nlist"} if kind == "ivf" else {"M", "ef_construction"})
    unknown = set(params) - allowed
    if unknown:
        raise PipelineError(f"unknown {kind} index parameter(s) {', '.join(sorted(unknown))}: "
                            f"use {', '.join(sorted(allowed))}.")
    t0 = time.perf_counter()
    n, c = flat.n, flat.channels
    rng = np.random.default_rng(0)
    n_train = min(n, int(params.get("train_size", 65536)))
    sample = np.ascontiguousarray(flat.vectors[np.sort(rng.choice(n, n_train, replace=False))])
    qt = faiss.ScalarQuantizer.QT_8bit
    if kind == "ivf":
        nlist = int(params.get("nlist") or max(1, min(int(round(math.sqrt(n))), n_train // 39 or 1)))
        inner = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(c), c, nlist, qt, faiss.METRIC_INNER_PRODUCT, False)
        inner.cp.seed = 1234
        info: dict[str, Any] = {"nlist": nlist}
    else:
        inner = faiss.IndexHNSWSQ(c, qt, int(params.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(params.get("ef_construction", 80))
        info = {"M": int(params.get("M", 32)), "ef_construction": inner.hnsw.efConstruction}
    inner.train(sample)
    index = faiss.IndexIDMap2(inner)
    for s in range(0, n, BLOCK):
        index.add_with_ids(np.ascontiguousarray(flat.vectors[s:s + BLOCK]), flat.rows[s:s + BLOCK])
    refine = int(params.get("refine", 4))
    del sample
    queries = _calibration_queries(flat, directions or [])
    if kind == "ivf":
        nlist = info["nlist"]
        ladder = [2 ** i for i in range(0, 16) if 2 ** i < nlist] + [nlist]
    else:
        ladder = [16, 32, 64, 128, 256, 512, 1024]
    approx = ApproxSearch(index, kind, flat, refine, ladder[-1])
    setting, recall = _calibrate(approx, flat, queries, float(params.get("target_recall", 0.99)), ladder)
    name = "nprobe" if kind == "ivf" else "ef_search"
    info.update({"n": n, "channels": c, "kind": kind, "metric": flat.metric, "refine": refine,
                 f"calibrated_{name}": setting, "calibration_recall_at_10": recall,
                 name: min(2 * setting, ladder[-1]),        # margin for queries unlike the calibration set
                 "calibration_queries": len(queries), "build_seconds": round(time.perf_counter() - t0, 3)})
    tmp = _tmp_dir(final)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    atomic_write_json(tmp / "manifest.json", {**manifest, **info})
    _replace_dir(tmp, final)
    return info


def _set_search_param(index: faiss.Index, kind: str, value: int) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = value
    else:
        faiss.downcast_index(index.index).hnsw.efSearch = value


def _calibration_queries(flat: FlatIndex, directions: list[np.ndarray]) -> list[np.ndarray]:
    """Queries like the real ones: stored vectors (neighbours) and ``directions`` (e.g. class-mean
    differences); without those, differences between the means of two neighbourhoods stand in.
    Arbitrary directions are left to the exact search."""
    rng = np.random.default_rng(1)
    picks = rng.choice(flat.n, min(flat.n, 32), replace=False)
    queries = [flat.vectors[i].astype(np.float64) for i in picks]
    queries += [np.asarray(d, np.float64) for d in directions]
    group = max(1, min(50, flat.n // 20))
    for a, b in rng.choice(flat.n, (0 if directions else 24, 2)):
        means = [flat.vectors[flat.search(flat.vectors[i].astype(np.float64), group)[0]].mean(0, dtype=np.float64)
                 for i in (a, b)]
        queries.append(means[0] - means[1])
    queries = [q for q in queries if np.linalg.norm(q) > 0]
    return [q / np.linalg.norm(q) for q in queries] if flat.metric == "cosine" else queries


def _calibrate(approx: ApproxSearch, flat: FlatIndex, queries: list[np.ndarray], target: float,
               ladder: list[int]) -> tuple[int, float]:
    """Smallest nprobe / efSearch in ``ladder`` whose mean recall@10 against exact search reaches
    ``target`` on ``queries`` with no query below 0.8 (a missed cluster loses a whole answer)."""
    k = min(10, flat.n)
    truth = [set(flat.search(q, k)[0].tolist()) for q in queries]
    recall = 0.0
    for value in ladder:
        approx.set(value)
        recalls = [len(t & set(approx.search(q, k)[0].tolist())) / k for t, q in zip(truth, queries)] or [1.0]
        recall = float(np.mean(recalls))
        if recall >= target and min(recalls) >= 0.8:
            return value, recall
    return ladder[-1], recall


class ApproxSearch:
    """An IVF or HNSW index with an exact re-rank of its ``refine * k`` candidates."""

    def __init__(self, index: faiss.Index, kind: str, flat: FlatIndex, refine: int, value: int) -> None:
        self.index, self.kind, self.flat, self.refine = index, kind, flat, refine
        self.set(value)

    @classmethod
    def load(cls, folder: Path, flat: FlatIndex) -> ApproxSearch:
        m = read_manifest(folder) or {}
        kind = m["kind"]
        value = m["nprobe"] if kind == "ivf" else m["ef_search"]
        return cls(faiss.read_index(str(folder / INDEX_FILE)), kind, flat, int(m["refine"]), int(value))

    def set(self, value: int) -> None:
        _set_search_param(self.index, self.kind, value)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` positions and exact scores among the index's ``refine * k`` candidates."""
        k = min(k, self.flat.n)
        with single_thread():
            _, ids = self.index.search(q.astype(np.float32)[None], max(k * self.refine, k + 8))
        pos = self.flat.positions(ids[0][ids[0] >= 0])
        pos = pos[pos >= 0]
        return self.flat.best(pos, self.flat.rescore(pos, q), k)

