"""What every importer shares: skip bookkeeping, file lookup, and the final clean-up of the rows it produced."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from ...errors import InputError

MANIFEST_COLUMNS = ("path", "label", "domain", "split")
_EXAMPLES = 5


class DatasetImportError(InputError):
    """A dataset root that does not look like the expected layout; the message says what was looked for."""


@dataclass
class Skips:
    """Rows left out, counted by reason, with a few examples of each for the report."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # oddities that skipped nothing (e.g. a wrong row count)

    def note(self, message: str) -> None:
        """Record an oddity of the published files that is worth a line in the report."""
        self.notes.append(message)

    def add(self, reason: str, examples: Iterable[str] | str = (), n: int | None = None) -> None:
        """Count `n` skipped rows (default: the number of examples) under `reason`."""
        examples = [examples] if isinstance(examples, str) else [str(e) for e in examples]
        n = len(examples) if n is None else n
        if n <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + n
        kept = self.examples.setdefault(reason, [])
        kept.extend(examples[:max(0, _EXAMPLES - len(kept))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def find_first(root: Path, candidates: Iterable[str], what: str) -> Path:
    """The first of `candidates` (paths relative to root) that exists; DatasetImportError listing them if none."""
    candidates = list(candidates)
    for c in candidates:
        p = root / c
        if p.exists():
            return p
    raise DatasetImportError(f"{root}: no {what} found (looked for {', '.join(candidates)})")


def find_optional(root: Path, candidates: Iterable[str]) -> Path | None:
    """The first of `candidates` that exists, or None."""
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def pick_base(candidates: Iterable[Path], relative_paths: list[str], sample: int = 20) -> Path:
    """The candidate folder under which most of the first `sample` relative paths exist (archives unpack with or
    without an extra top-level folder, e.g. `MET/MET/...`); the first candidate on a tie."""
    candidates = list(candidates)
    probe = relative_paths[:sample]
    scores = [sum((c / r).exists() for r in probe) for c in candidates]
    return candidates[max(range(len(candidates)), key=lambda i: (scores[i], -i))]


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file (tolerates a UTF-8 BOM and Windows line ends)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with a DatasetImportError naming the file on failure."""
    try:
        return pd.read_csv(path, **kwargs)
    except Exception as e:  # pandas raises ParserError, UnicodeDecodeError, EmptyDataError...
        raise DatasetImportError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from None


def require_columns(df: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    """DatasetImportError naming the file when a published column is missing (wrong file or wrong dataset)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetImportError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def _header_ok(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (the header is parsed lazily on open; size proves it was)
        return True
    except Exception:
        return False


def finalize(df: pd.DataFrame, skips: Skips, domain: str, verify: bool = False, workers: int = 8) -> pd.DataFrame:
    """Common clean-up of an importer's rows: labels as strings, rows without label, duplicate paths, missing
    or empty files (and with `verify`, files whose image header PIL cannot read) are dropped and counted.

    Column order: path, label, domain, split (when present), then the importer's extra columns.
    """
    df = df.reset_index(drop=True)
    if "domain" not in df.columns:
        df["domain"] = domain
    label = df["label"]
    bad = label.isna() | (label.astype(str).str.strip().isin(["", "nan", "None"]))
    skips.add("bad label", df.loc[bad, "path"].astype(str).head(5), n=int(bad.sum()))
    df = df[~bad].copy()
    df["label"] = df["label"].astype(str).str.strip()
    df["path"] = df["path"].astype(str)
    dup = df["path"].duplicated()
    skips.add("duplicate path", df.loc[dup, "path"].head(5), n=int(dup.sum()))
    df = df[~dup]
    sizes = [_size(p) for p in df["path"]]
    missing = [s is None for s in sizes]
    empty = [s == 0 for s in sizes]
    skips.add("missing file", df.loc[missing, "path"].head(5), n=sum(missing))
    skips.add("empty file", df.loc[empty, "path"].head(5), n=sum(empty))
    df = df[[s is not None and s > 0 for s in sizes]]
    if verify and len(df):
        with ThreadPoolExecutor(max_workers=workers) as pool:  # header reads are I/O bound
            ok = list(pool.map(_header_ok, df["path"], chunksize=64))
        bad_img = [not o for o in ok]
        skips.add("unreadable image", df.loc[bad_img, "path"].head(5), n=sum(bad_img))
        df = df[ok]
    front = [c for c in MANIFEST_COLUMNS if c in df.columns]
    return df[front + [c for c in df.columns if c not in front]].reset_index(drop=True)


def _size(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return None if stat.S_ISDIR(st.st_mode) else st.st_size
