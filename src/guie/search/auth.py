"""Who may read and write through the search service: the API key, and the Host check on loopback.

The access model (docs/search.md says the same):
- With a key set, every read (search, items, thumbnails, the OpenAPI schema) and every write needs it; `/health`
  answers a bare `{"status": "ok"}` without it, and the page and its script are static.
- Without a key the server only listens on loopback; reads are open to local clients and writes are refused.
- On loopback (and wherever extra host names are allowed) the `Host` header must name the server (127.0.0.1,
  localhost, [::1], the interface it listens on or an allowed name): a web page that rebinds its own DNS name to
  127.0.0.1 cannot read the index through a local browser.
"""
from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

from ..errors import InputError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MIN_KEY_CHARS = 8


def is_loopback(host: str) -> bool:
    """Whether an interface name or address only reaches this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_header_names(host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The names a `Host` header may carry for a server listening on `host`: the loopback names, `host` itself
    (IPv6 in brackets, as clients send it) and the `extra` names (e.g. a name in /etc/hosts or a tunnel's)."""
    names = []
    for name in (*LOOPBACK_NAMES, host, *extra):
        name = name.strip().lower()
        if ":" in name and not name.startswith("["):
            name = f"[{name}]"
        if name and name not in names:
            names.append(name)
    return names


def read_api_key(key: str | None = None, key_file: str | Path | None = None) -> str | None:
    """The API key from `key` (a value, e.g. GUIE_API_KEY) or from the first line of `key_file`; None when
    neither is given. A key file keeps the key out of `ps` and the shell history."""
    if key is not None and key_file is not None:
        raise InputError("give the API key once: as a value or in a key file, not both")
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"{path}: API key file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read the API key file ({e.__class__.__name__})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise InputError(f"{path}: the API key file is empty (write the key on its first line)")
    return key


def presented_key(headers) -> str | None:
    """The key a request carries: `X-API-Key`, or `Authorization: Bearer <key>`."""
    key = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def key_matches(expected: str | None, presented: str | None) -> bool:
    """Constant-time comparison; False when no key is configured or none was presented."""
    return bool(expected) and presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
