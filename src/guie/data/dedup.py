"""Exact and near-duplicate images, within a manifest and between training data and evaluation sets.

Three detectors, from cheapest to most tolerant:
* exact: SHA-1 of the file bytes (the same file copied or re-uploaded unchanged);
* phash: 64-bit DCT perceptual hash (imagehash.phash) within a Hamming distance (re-encoded, resized, lightly
  edited copies), searched with a FAISS binary index;
* embedding: cosine similarity of model embeddings above a threshold (crops, colour changes, screenshots),
  searched with a FAISS inner-product index. The vectors come from `DedupConfig.embed`, a function paths ->
  (vectors, ok mask) that the caller supplies (`guie.embedding.engine.path_embedder(model)`): curation code does
  not import the embedding engine.

Leakage (evaluation images that also occur in training data) is the most common way such projects fool themselves:
`find_leaks` reports them and `drop_leaks` removes them from the evaluation side.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError
from ..imaging.io import ImageLoadError, check_image_header, load_image, parse_shard_ref, read_image_bytes
from .validate import parallel_map

METHODS = ("exact", "phash", "embedding")
PAIR_COLUMNS = ["i", "j", "method", "score"]


@dataclass
class DedupConfig:
    """Which detectors to run and their thresholds."""

    methods: tuple[str, ...] = ("exact", "phash")
    max_distance: int = 4            # phash: Hamming distance <= this (of 64 bits) is a near duplicate
    min_cosine: float = 0.95         # embedding: cosine >= this is a near duplicate
    # embedding: paths -> (float32 [N, d], ok [N]), e.g. guie.embedding.engine.path_embedder("efficientnet_lite0")
    embed: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]] | None = None

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        if not 0 <= self.max_distance <= 32:
            raise InputError(f"max_distance must be in 0..32 bits, got {self.max_distance}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise InputError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if "embedding" in self.methods and self.embed is None:
            raise InputError("the embedding method needs an embed function (DedupConfig.embed), e.g. "
                             "guie.embedding.engine.path_embedder(model)")


def bytes_digest(data: bytes) -> str:
    """The content identity of a file's bytes (SHA-1 hex), as `file_digests` computes it."""
    return hashlib.sha1(data).hexdigest()


def file_digest(path: str) -> str:
    """`bytes_digest` of a file (or shard member) read in chunks, so a huge file costs no memory. Raises
    ImageLoadError (missing, empty, a folder) naming it."""
    if parse_shard_ref(path) is not None:  # a member's bytes are bounded by its recorded size
        return bytes_digest(read_image_bytes(path))
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageLoadError(path, "empty file (0 bytes)", "empty")
            return hashlib.file_digest(f, "sha1").hexdigest()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found", "missing") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a folder, not an image", "format") from None


def _digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except (ImageLoadError, OSError):
        return None


def _image_digest(path: str) -> str | None:
    try:
        check_image_header(path)
        return file_digest(path)
    except (ImageLoadError, OSError):
        return None


def file_digests(paths: Sequence[str], workers: int | None = None, progress: bool = False,
                 images_only: bool = False) -> list[str | None]:
    """SHA-1 hex digest of each file's bytes (shard references included), read in chunks; None where the file
    cannot be read, or (`images_only`) where its header is not an image's, which is checked first so a stray
    non-image is never read whole."""
    return parallel_map(_image_digest if images_only else _digest, list(paths), workers, chunksize=64,
                        progress=progress, desc="sha1")


def _phash(path: str) -> bytes | None:
    import imagehash

    try:
        image = load_image(path, draft_size=64)  # phash looks at 32x32 grey: a JPEG draft decode is enough
    except ImageLoadError:
        return None
    return np.packbits(imagehash.phash(image, hash_size=8).hash.reshape(-1)).tobytes()


def perceptual_hashes(paths: Sequence[str], workers: int | None = None,
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """64-bit perceptual hashes as uint8 [N, 8] plus an `ok` mask (False: undecodable, row left zero)."""
    raw = parallel_map(_phash, list(paths), workers, chunksize=32, progress=progress, desc="phash")
    ok = np.array([r is not None for r in raw], dtype=bool)
    codes = np.zeros((len(raw), 8), dtype=np.uint8)
    for k, r in enumerate(raw):
        if r is not None:
            codes[k] = np.frombuffer(r, dtype=np.uint8)
    return codes, ok


def exact_pairs(digests_a: Sequence[str | None], digests_b: Sequence[str | None] | None = None) -> pd.DataFrame:
    """Pairs (i in a, j in b) with equal digests; within `a` alone (b None) only i < j."""
    within = digests_b is None
    b = digests_a if within else digests_b
    where: dict[str, list[int]] = {}
    for j, d in enumerate(b):
        if d is not None:
            where.setdefault(d, []).append(j)
    rows = []
    for i, d in enumerate(digests_a):
        for j in where.get(d, ()) if d is not None else ():
            if not within or j > i:
                rows.append((i, j, "exact", 1.0))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _range_pairs(index, queries: np.ndarray, radius, within: bool, method: str, to_score,
                 chunk: int = 4096) -> pd.DataFrame:
    parts = []
    for lo in range(0, len(queries), chunk):
        lims, dist, idx = index.range_search(queries[lo:lo + chunk], radius)
        i = np.repeat(np.arange(lo, lo + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = idx > i if within else np.ones(len(idx), dtype=bool)
        parts.append(pd.DataFrame({"i": i[keep], "j": idx[keep].astype(np.int64), "method": method,
                                   "score": to_score(dist[keep])}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PAIR_COLUMNS)


def phash_pairs(codes_a: np.ndarray, codes_b: np.ndarray | None = None, max_distance: int = 4,
                ok_a: np.ndarray | None = None, ok_b: np.ndarray | None = None) -> pd.DataFrame:
    """Pairs whose perceptual hashes differ in at most `max_distance` bits; score = the Hamming distance.

    Brute-force FAISS binary range search (popcount over 64-bit codes: ~10^9 comparisons/s per core).
    """
    import faiss

    within = codes_b is None
    b, ok_b = (codes_a, ok_a) if within else (codes_b, ok_b)
    ok_a = np.ones(len(codes_a), bool) if ok_a is None else ok_a
    ok_b = np.ones(len(b), bool) if ok_b is None else ok_b
    if not ok_a.any() or not ok_b.any():
        return pd.DataFrame(columns=PAIR_COLUMNS)
    ia, ib = np.flatnonzero(ok_a), np.flatnonzero(ok_b)
    index = faiss.IndexBinaryFlat(codes_a.shape[1] * 8)
    index.add(np.ascontiguousarray(b[ib]))
    # FAISS returns distances strictly below the radius
    pairs = _range_pairs(index, np.ascontiguousarray(codes_a[ia]), max_distance + 1, False, "phash",
                         lambda d: d.astype(np.float64))
    pairs["i"], pairs["j"] = ia[pairs["i"].to_numpy(dtype=np.int64)], ib[pairs["j"].to_numpy(dtype=np.int64)]
    if within:
        pairs = pairs[pairs["j"] > pairs["i"]]
    return pairs.reset_index(drop=True)


def embedding_pairs(emb_a: np.ndarray, emb_b: np.ndarray | None = None, min_cosine: float = 0.95) -> pd.DataFrame:
    """Pairs with cosine similarity >= `min_cosine` (rows are L2-normalised here); score = the cosine."""
    import faiss

    def norm(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a = norm(emb_a)
    b = a if emb_b is None else norm(emb_b)
    index = faiss.IndexFlatIP(a.shape[1])
    index.add(b)
    # range_search on inner products keeps scores > radius; nudge to make the threshold inclusive
    return _range_pairs(index, a, float(np.nextafter(np.float32(min_cosine), np.float32(-2))), emb_b is None,
                        "embedding", lambda d: d.astype(np.float64))


@dataclass
class DuplicateReport:
    """Duplicate pairs between rows of `a` and rows of `b` (b is a itself for within-manifest reports)."""

    pairs: pd.DataFrame                         # i, j, method, score, path_i, path_j, label_i, label_j
    unreadable: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Pairs per method (a pair found by two methods is counted under each)."""
        return self.pairs["method"].value_counts().to_dict() if len(self.pairs) else {}


def _embeddings(df: pd.DataFrame, cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    emb, ok = cfg.embed(df["path"].astype(str).tolist())
    return np.asarray(emb, dtype=np.float32), np.asarray(ok, dtype=bool)


def _pairs_for(df_a: pd.DataFrame, df_b: pd.DataFrame | None, cfg: DedupConfig, workers: int | None,
               progress: bool) -> DuplicateReport:
    frames, unreadable = [], {}
    paths_a = df_a["path"].astype(str).tolist()
    paths_b = None if df_b is None else df_b["path"].astype(str).tolist()
    if "exact" in cfg.methods:
        da = file_digests(paths_a, workers, progress)
        db = None if paths_b is None else file_digests(paths_b, workers, progress)
        unreadable["exact"] = sum(d is None for d in da) + (0 if db is None else sum(d is None for d in db))
        frames.append(exact_pairs(da, db))
    if "phash" in cfg.methods:
        ca, oka = perceptual_hashes(paths_a, workers, progress)
        cb, okb = (None, None) if paths_b is None else perceptual_hashes(paths_b, workers, progress)
        unreadable["phash"] = int((~oka).sum() + (0 if okb is None else (~okb).sum()))
        frames.append(phash_pairs(ca, cb, cfg.max_distance, oka, okb))
    if "embedding" in cfg.methods:
        ea, oka = _embeddings(df_a, cfg)
        eb, okb = (None, None) if df_b is None else _embeddings(df_b, cfg)
        unreadable["embedding"] = int((~oka).sum() + (0 if okb is None else (~okb).sum()))
        p = embedding_pairs(ea, eb, cfg.min_cosine)
        ok_j = oka if okb is None else okb
        p = p[oka[p["i"].to_numpy(dtype=np.int64)] & ok_j[p["j"].to_numpy(dtype=np.int64)]]
        frames.append(p)
    pairs = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) \
        else pd.DataFrame(columns=PAIR_COLUMNS)
    other = df_a if df_b is None else df_b
    pairs["i"] = pairs["i"].astype(np.int64)
    pairs["j"] = pairs["j"].astype(np.int64)
    pairs["path_i"] = df_a["path"].to_numpy()[pairs["i"].to_numpy()]
    pairs["path_j"] = other["path"].to_numpy()[pairs["j"].to_numpy()]
    if "label" in df_a.columns and "label" in other.columns:
        pairs["label_i"] = df_a["label"].astype(str).to_numpy()[pairs["i"].to_numpy()]
        pairs["label_j"] = other["label"].astype(str).to_numpy()[pairs["j"].to_numpy()]
    pairs = pairs.sort_values(["i", "j", "method"]).reset_index(drop=True)
    return DuplicateReport(pairs, {k: v for k, v in unreadable.items() if v})


def find_duplicates(df: pd.DataFrame, cfg: DedupConfig | None = None, workers: int | None = None,
                    progress: bool = False) -> DuplicateReport:
    """Duplicate pairs (i < j) among the rows of one manifest. Pairs with different labels are label noise or
    cross-class duplicates; pairs with the same label inflate that class."""
    return _pairs_for(df.reset_index(drop=True), None, cfg or DedupConfig(), workers, progress)


def find_leaks(eval_df: pd.DataFrame, train_df: pd.DataFrame, cfg: DedupConfig | None = None,
               workers: int | None = None, progress: bool = False) -> DuplicateReport:
    """Evaluation rows (i) that duplicate a training row (j): images the model may have been trained on."""
    return _pairs_for(eval_df.reset_index(drop=True), train_df.reset_index(drop=True), cfg or DedupConfig(),
                      workers, progress)


def duplicate_groups(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """Connected components of the duplicate graph: group id per row (rows without duplicates are alone)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = pairs["i"].to_numpy(dtype=np.int64), pairs["j"].to_numpy(dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def drop_duplicates(df: pd.DataFrame, report: DuplicateReport) -> pd.DataFrame:
    """Keep the first row of every duplicate group (within-manifest report)."""
    df = df.reset_index(drop=True)
    groups = duplicate_groups(len(df), report.pairs)
    keep = ~pd.Series(groups).duplicated().to_numpy()
    return df[keep].reset_index(drop=True)


def drop_leaks(eval_df: pd.DataFrame, report: DuplicateReport) -> pd.DataFrame:
    """The evaluation rows that duplicate no training image (leak report from `find_leaks`)."""
    eval_df = eval_df.reset_index(drop=True)
    leaked = np.zeros(len(eval_df), dtype=bool)
    leaked[report.pairs["i"].to_numpy(dtype=np.int64)] = True
    return eval_df[~leaked].reset_index(drop=True)
