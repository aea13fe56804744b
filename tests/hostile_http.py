"""The hostile-request corpus of the search service: requests a hostile or broken client sends to `guie serve`,
each with the answer it must get (never a 500, never data it may not see). `tests/test_search_serve_hostile.py` sends
every case to a real `guie serve` process; the hostile images and files live in `conftest.py`
(`write_bad_files`, `png_header_only`, `png_one_bit`) and `write_hostile_images` here.

A case is (name, method, path, headers, body, expected status, a fragment of the answer); body is bytes, None or
`multipart(...)`'s (headers, bytes). `{key}` in a header is replaced by the server's API key. Socket-level
cases (stalled or abandoned uploads, decode-heavy bursts) are tests of their own.
"""
from __future__ import annotations

import json
from pathlib import Path

from conftest import png_header_only, png_one_bit

BOUNDARY = "hostile-boundary"


def multipart(fields: list[tuple[str, str | bytes, str | None]]) -> tuple[dict, bytes]:
    """(headers, body) of a multipart/form-data request; a field is (name, value, file name or None)."""
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += (b"Content-Type: image/png\r\n" if filename else b"") + b"\r\n"
        out += (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, out


def write_hostile_images(root: Path) -> dict[str, Path]:
    """Images that decode (they are under the declared-pixel cap) but cost far more to decode than their bytes:
    kind -> path. `decode_heavy`: the issue's 1-bit 5700x5700 PNG (32.5 Mpx in 11 KB); `heavy_query`: a 1-bit
    3900x3900 PNG (15.2 Mpx, under the query cap); `bomb`: a PNG header declaring 40,000 x 40,000."""
    root.mkdir(parents=True, exist_ok=True)
    return {"decode_heavy": png_one_bit(root / "heavy-5700.png", 5700, 5700),
            "heavy_query": png_one_bit(root / "heavy-3900.png", 3900, 3900),
            "bomb": png_header_only(root / "bomb.png", 40_000, 40_000)}


def hostile_cases(images: dict[str, Path], good_png: bytes) -> list[tuple]:
    """The corpus (see the module docstring) for a keyed server on 127.0.0.1 whose index holds items 0..n."""
    key = {"X-API-Key": "{key}"}
    heavy, query = images["decode_heavy"].read_bytes(), images["heavy_query"].read_bytes()
    deep = "[" * 100_000 + "]" * 100_000  # a RecursionError in json.loads: was a 500
    cases = [
        # access (issue 26, items 1-2)
        ("search without the key", "POST", "/search", {}, multipart([("item", "1", None)]), 401, "API key"),
        ("search with a wrong key", "POST", "/search", {"X-API-Key": "wrong-key-12345"},
         multipart([("item", "1", None)]), 401, "API key"),
        ("item metadata without the key", "GET", "/items/1", {}, None, 401, "API key"),
        ("thumbnail without the key", "GET", "/items/1/thumbnail", {}, None, 401, "API key"),
        ("openapi schema without the key", "GET", "/openapi.json", {}, None, 401, "API key"),
        ("docs page", "GET", "/docs", {}, None, 404, ""),
        ("health without the key: liveness only", "GET", "/health", {}, None, 200, '{"status":"ok"}'),
        ("a rebinding page's Host", "GET", "/items/1", {**key, "Host": "attacker.rebind.example"}, None, 400,
         "Invalid host header"),
        ("a rebinding page's Host with a port", "POST", "/search", {"Host": "attacker.rebind.example:8000"},
         multipart([("item", "1", None)]), 400, "Invalid host header"),
        # bad input (items 15, 17)
        ("deeply nested metadata", "POST", "/items", key,
         multipart([("files", good_png, "a.png"), ("metadata", deep[:60_000], None)]), 422, "metadata"),
        ("metadata nested past the depth limit", "POST", "/items", key,
         multipart([("files", good_png, "a.png"), ("metadata", json.dumps({"a": [[[[[[[[1]]]]]]]]}), None)]),
         422, "nests deeper"),
        ("an empty item field", "POST", "/search", key, multipart([("item", "", None)]), 400, "item is empty"),
        ("more files than max_files", "POST", "/search", key,
         multipart([("files", good_png, f"{i}.png") for i in range(9)]), 413, "at most 8"),
        ("far more files than max_files", "POST", "/search", key,
         multipart([("files", good_png, f"{i}.png") for i in range(40)]), 413, "at most 8"),
        # decode work (item 4)
        ("an 11 KB PNG decoding to 32.5 Mpx", "POST", "/search", key, multipart([("files", heavy, "h.png")]), 413,
         "a query image may have"),
        ("five 15 Mpx PNGs in one search", "POST", "/search", key,
         multipart([("files", query, f"q{i}.png") for i in range(5)]), 413, "one search may decode"),
        ("a decompression bomb", "POST", "/search", key,
         multipart([("files", images["bomb"].read_bytes(), "b.png")]), 400, "decompression bomb"),
        ("a declared body over the cap", "POST", "/search", {**key, "Content-Length": str(2**40)}, b"", 413,
         "request body larger"),
        # issue 30: the cut-off, paging, duplicates and metrics get the same rules
        ("duplicates without the key", "GET", "/duplicates", {}, None, 401, "API key"),
        ("metrics without the key", "GET", "/metrics", {}, None, 401, "API key"),
        ("a NaN max_distance", "POST", "/search", key, multipart([("item", "1", None), ("max_distance", "nan", None)]),
         422, "max_distance"),
        ("a negative offset", "POST", "/search", key, multipart([("item", "1", None), ("offset", "-5", None)]), 422,
         "offset"),
        ("a page past max_depth", "POST", "/search", key,
         multipart([("item", "1", None), ("offset", "999999999999", None)]), 422, "offset"),
        ("a huge limit", "POST", "/search", key, multipart([("item", "1", None), ("limit", "10" * 40, None)]), 422,
         "limit"),
        ("duplicates with an infinite distance", "GET", "/duplicates?max_distance=inf", key, None, 422,
         "max_distance"),
    ]
    return cases
