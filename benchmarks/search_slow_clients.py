"""A normal search's latency while hostile clients attack `guie serve`, on 127.0.0.1 only (issue 26, items 3-4).

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/search_slow_clients.py [--searches 100] [--json out.json] \
        [--server-pythonpath OTHER/src]    # e.g. an older checkout's src, to measure it the same way

The default embedder (EfficientNet-Lite0 + a 64-d head, 224 px) over 400 emoji (or generated PNGs) is served by
`guie serve` in its own process with a key; one client runs `--searches` one-image searches back to back
(pre-encoded multipart bodies over `http.client`) in each phase and reports p50/p95 and the status counts:

1. quiet: nothing else runs;
2. stalled: 64 clients each send a search's headers and 150 bytes of its body, then stall; a staller the server
   drops (408 after its grace period) connects again at once, so 64 stall for the whole phase;
3. heavy: 16 clients post, back to back (no pause after a refusal), the costliest search the server still decodes:
   four 1-bit 3900x3900 PNGs (15.2 Mpx each, 61 Mpx in all, 20 KB);
4. heavy-issue: the same with the issue's payload, eight 1-bit 5700x5700 PNGs (32.5 Mpx each) per request.
Each phase ends after `--searches` searches or `--max-seconds`; every loop is bounded in count and time. The goal:
p95 of phases 2-4 within 2x of phase 1's.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402
from search_serve import KEY, free_port, images, multipart  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import png_one_bit  # noqa: E402
from hostile_http import multipart as multipart_fields  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def start_server(name: str, port: int, pythonpath: str | None) -> subprocess.Popen:
    env = {**os.environ, "GUIE_API_KEY": KEY}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    server = subprocess.Popen([sys.executable, "-m", "guie.cli", "serve", name, "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and server.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.3)
    raise SystemExit("server did not start: " + (server.stderr.read() if server.poll() is not None else ""))


def searches(port: int, bodies: list[tuple[bytes, str]], n: int, max_seconds: float) -> dict:
    """n one-image searches back to back on one connection: p50/p95 (ms) and status counts."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies, statuses = [], {}
    stop_at = time.perf_counter() + max_seconds
    for i in range(n):
        if time.perf_counter() > stop_at:
            break
        body, ctype = bodies[i % len(bodies)]
        t = time.perf_counter()
        try:
            conn.request("POST", "/search", body=body, headers={"Content-Type": ctype, "X-API-Key": KEY})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except OSError:
            status, conn = "error", http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        latencies.append(time.perf_counter() - t)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    conn.close()
    return {"searches": len(latencies), "status": statuses,
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1),
            "max_ms": round(1000 * max(latencies), 1)}


class Attack:
    """`clients` threads running `one(stop)` in a loop until stopped (bounded by the phase's time)."""

    def __init__(self, clients: int, one):
        self.stop, self.counts, self.lock = threading.Event(), {}, threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(one,), daemon=True) for _ in range(clients)]

    def _loop(self, one):
        while not self.stop.is_set():
            outcome = one(self.stop)
            with self.lock:
                self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(1.0)  # let the attack settle before measuring
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def staller(port: int):
    head = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 200000\r\n\r\n").encode()

    def one(stop: threading.Event) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head + b"--zz\r\n" + b"x" * 144)  # the headers and 150 bytes of the body
            s.settimeout(1.0)
            while not stop.is_set():
                try:
                    data = s.recv(64)
                    return data.split(b" ")[1].decode() if data else "closed"
                except TimeoutError:
                    continue
            return "still stalled at the end"

    return one


def poster(port: int, body: bytes, ctype: str):
    def one(stop: threading.Event) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/search", body=body, headers={"Content-Type": ctype, "X-API-Key": KEY})
            resp = conn.getresponse()
            resp.read()
            return str(resp.status)
        except OSError as e:
            return type(e).__name__
        finally:
            conn.close()

    return one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--searches", type=int, default=100, help="normal searches per phase")
    ap.add_argument("--max-seconds", type=float, default=90.0, help="longest a phase may run")
    ap.add_argument("--index-size", type=int, default=400)
    ap.add_argument("--server-pythonpath", help="PYTHONPATH for the server process (another checkout's src)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import pandas as pd
    import torch

    from guie.models import create_embedder, save_embedder
    from guie.search.encoder import describe_model
    from guie.search.image_index import ImageIndex
    from guie.search.ingest import add_source

    report: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "server": args.server_pythonpath or "this"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = images(max(args.index_size, 64), tmp)
        torch.manual_seed(0)
        model_path = save_embedder(create_embedder(embed_dim=64), tmp / "model.pt")
        from guie.models import load_embedder

        embedder = load_embedder(model_path).eval()
        os.environ["GUIE_INDEX_HOME"] = str(tmp / "indexes")
        pd.DataFrame({"path": [str(p) for p in files[:args.index_size]]}).to_csv(tmp / "m.csv", index=False)
        with ImageIndex.create("bench", dim=64, model=describe_model(embedder, model_path)) as index:
            add_source(index, tmp / "m.csv", embedder, progress=False)
        del embedder
        bodies = [multipart(p.read_bytes(), "q.png") for p in files[:64]]
        heavy = png_one_bit(tmp / "heavy-3900.png", 3900, 3900).read_bytes()
        issue = png_one_bit(tmp / "heavy-5700.png", 5700, 5700).read_bytes()
        heavy_headers, heavy_body = multipart_fields([("files", heavy, f"h{i}.png") for i in range(4)])
        issue_headers, issue_body = multipart_fields([("files", issue, f"h{i}.png") for i in range(8)])

        port = free_port()
        server = start_server("bench", port, args.server_pythonpath)
        try:
            searches(port, bodies, 10, 60)  # warm-up
            phases = {"quiet": None, "stalled": Attack(64, staller(port)),
                      "heavy": Attack(16, poster(port, heavy_body, heavy_headers["Content-Type"])),
                      "heavy-issue": Attack(16, poster(port, issue_body, issue_headers["Content-Type"]))}
            for name, attack in phases.items():
                if attack is None:
                    row = searches(port, bodies, args.searches, args.max_seconds)
                else:
                    with attack:
                        row = searches(port, bodies, args.searches, args.max_seconds)
                    row["attackers"] = dict(sorted(attack.counts.items()))
                row = {"phase": name, **row}
                if name != "quiet":
                    row["p95_over_quiet"] = round(row["p95_ms"] / report["quiet"]["p95_ms"], 2)
                report[name] = row
                emit(row)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:  # an older server may still be decoding what it was sent
                server.kill()
                server.wait()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
