"""`where` conditions (`col=value[,value2]`): one typed meaning, compiled for SQLite (faiss indexes filter through
the store) and for Milvus (which filters inside the collection), so the same condition selects the same items on
every backend.

The meaning:
    * `col=v1,v2` keeps items whose `col` equals any of the values; several conditions must all hold.
    * The item's stored value decides how a value compares: a text value compares as text (exact, case-sensitive);
      a number compares as a number (`n=2` matches 2 and 2.0, `x=0.50` matches 0.5); a boolean is the number 1 or 0
      (`flag=true`, `flag=True` and `flag=1` match true: JSON in Milvus and SQLite compare them so, and a manifest
      column of 0/1 means the same as one of False/True). A missing or null value matches nothing.
    * `id` is the item id (integers only); `path` and `label` are text.

`matches` is the same rule in Python: the reference the tests hold both backends to.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from ..errors import InputError

TEXT_COLUMNS = ("path", "label")  # stored in their own (text) columns; every other manifest column is metadata
ID_COLUMN = "id"
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_BOOLEANS = {"true": 1, "false": 0}


def parse_where(conditions: Sequence[str] | dict | None) -> dict[str, list[str]]:
    """`["vendor=apple,google", "split=test"]` (or a dict) -> {"vendor": ["apple", "google"], "split": ["test"]}."""
    if not conditions:
        return {}
    if isinstance(conditions, dict):
        return {str(k): [_text(x) for x in (v if isinstance(v, (list, tuple)) else [v])] for k, v in conditions.items()}
    out: dict[str, list[str]] = {}
    for cond in conditions:
        col, sep, values = str(cond).partition("=")
        if not sep or not col.strip():
            raise InputError(f"filter {cond!r} must look like column=value")
        out.setdefault(col.strip(), []).extend(values.split(","))
    return out


def _text(value) -> str:
    """A dict condition's value as the text a user would type (`True` -> "true", 2.0 -> "2.0")."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def json_scalar(value):
    """A metadata value as what is stored and compared: a JSON scalar (numpy scalars to Python, NaN to null,
    anything else to its text)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            value = str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def as_number(text: str) -> int | float | None:
    """The number a condition value also means (`"2"` -> 2, `"2.5"` -> 2.5, `"true"` -> 1), or None."""
    t = text.strip()
    if t.lower() in _BOOLEANS:
        return _BOOLEANS[t.lower()]
    if not _NUMBER.match(t):
        return None
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    x = float(t)
    return x if math.isfinite(x) else None


def _ids(col: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise InputError(f"filter {col}={','.join(values)}: item ids are integers") from None


def matches(value, text: str) -> bool:
    """Whether a stored metadata value equals the condition value `text` (the rule in the module docstring)."""
    value = json_scalar(value)
    if value is None:
        return False
    if isinstance(value, str):
        return value == text
    n = as_number(text)
    return n is not None and float(value) == float(n)


def sql_where(conditions: dict[str, list[str]]) -> tuple[str, list]:
    """(SQL boolean expression over the store's `items` table, its parameters) for `parse_where` output."""
    clauses, args = [], []
    for col, values in conditions.items():
        if col == ID_COLUMN:
            clauses.append("id IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(_ids(col, values)))
        elif col in TEXT_COLUMNS:
            clauses.append(f"{col} IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(values))
        else:
            path = f'$."{col}"'
            numbers = [n for n in map(as_number, values) if n is not None]
            clauses.append("((json_type(meta, ?) = 'text' AND json_extract(meta, ?) IN "
                           "(SELECT value FROM json_each(?))) OR (json_type(meta, ?) IN ('integer', 'real', 'true', "
                           "'false') AND json_extract(meta, ?) IN (SELECT value FROM json_each(?))))")
            args += [path, path, json.dumps(values), path, path, json.dumps(numbers)]
    return " AND ".join(clauses) or "1", args


def milvus_expression(conditions: dict[str, list[str]]) -> str:
    """The same conditions as a Milvus boolean expression over the primary key `id` and the JSON field `attrs`.

    Milvus's JSON comparison is typed as the rule needs (a text never equals a number; true equals 1); its `in`
    does not take JSON paths, hence the `or` chains."""
    clauses = []
    for col, values in conditions.items():
        if col == ID_COLUMN:
            clauses.append(f"id in {json.dumps(_ids(col, values))}")
            continue
        field = f"attrs[{json.dumps(col)}]"
        alternatives = [f"{field} == {json.dumps(v)}" for v in values]
        if col not in TEXT_COLUMNS:
            alternatives += [f"{field} == {n!r}" for n in map(as_number, values) if n is not None]
        clauses.append("(" + " or ".join(alternatives) + ")")
    return " and ".join(clauses)
