"""The search server under load, on 127.0.0.1 only: dynamic batching vs the bare batched forward, then a bounded
load test (searches + writes) with latency percentiles and the server's RSS per round, then a burst.

    flock /tmp/guie-cpu.lock .venv/bin/python benchmarks/search_serve.py [--clients 8] [--searches 25] \
        [--rounds 4] [--seconds 20] [--runtime auto] [--precision auto] [--json out.json]

1. bare: the default embedder (efficientnet_lite0 + a 64-d head, 224 px) on preprocessed uint8 batches in this
   process, through the same engine forward the server uses (`pixel_forward`), at batch 8 and 32, as one caller
   on all intra-op threads and as one single-threaded forward per thread side by side (how the server runs it on
   CPU): images/s, measured before and after phase 2 (while the server idles) and averaged.
2. served: `guie serve` in its own process (dynamic batching on), `--clients` threads each posting one emoji image
   per POST /search (k=5), back to back, for `--seconds`: images/s, its ratio to the best bare rate and to bare at
   batch 8, and the CPU (cores) the server and the clients used meanwhile.
3. load test: `--rounds` rounds of `--clients` clients x `--searches` searches, each client also adding one new
   image (POST /items) and deleting it (DELETE) per round: status counts (no 5xx expected), p50/p95 latency, the
   server's peak RSS per round (sampled every 50 ms).
4. burst: 64 requests of 8 images at once against a queue of 128 images: how many got 503 (refused at once
   instead of queueing without bound) and that the server answers normally afterwards.
Every loop is bounded in count and time and talks to 127.0.0.1 only. Images: the emoji test set when built,
else generated PNGs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MANIFEST, cpu_name  # noqa: E402

KEY = "benchmark-key-0123"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def images(n: int, tmp: Path) -> list[Path]:
    """n query/index images: emoji PNGs when the set is built, else generated ones."""
    manifest = Path(DEFAULT_MANIFEST)
    if manifest.is_file():
        import pandas as pd

        df = pd.read_csv(manifest)
        return [manifest.parent / p for p in df[df["split"] == "test"]["path"].iloc[:n]]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = tmp / f"gen{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def bare_rates(model_path: Path, files: list[Path], seconds: float = 5.0, runtime: str = "auto",
               precision: str = "auto") -> dict[str, float]:
    """Images/s of the engine's forward on preprocessed batches at batch 8 and 32 (a timed loop each): one forward
    on all intra-op threads ("8", "32"), and one single-threaded forward per thread running side by side
    ("8x1t", "32x1t": how the server runs torch on CPU; OpenVINO splits every call over its streams itself)."""
    import torch

    from guie.embedding.engine import pixel_forward
    from guie.imaging.io import load_image
    from guie.models import load_embedder
    from guie.runtime import intra_op_threads

    embedder = load_embedder(model_path).eval()
    forward = pixel_forward(embedder, runtime=runtime, precision=precision)
    pixels = torch.stack([embedder.transform(load_image(p)) for p in files[:32]])
    threads = torch.get_num_threads()

    def timed(batch: torch.Tensor, workers: int) -> float:
        forward(batch)  # warm-up
        counts, stop_at = [0] * workers, time.perf_counter() + seconds

        def loop(w: int) -> None:
            while time.perf_counter() < stop_at:
                forward(batch)
                counts[w] += len(batch)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(loop, range(workers)))
        return sum(counts) / (time.perf_counter() - t0)

    rates = {}
    for b in (8, 32):
        rates[str(b)] = timed(pixels[:b], 1)
    if threads > 1:
        with intra_op_threads(1):
            for b in (8, 32):
                rates[f"{b}x1t"] = timed(pixels[:b], threads)
    return rates


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def multipart(data: bytes, name: str, k: int = 5) -> tuple[bytes, str]:
    """A multipart/form-data body with one image (`files`) and `k`, and its content type."""
    b = "guie-benchmark-boundary"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler:
    """Peak RSS of a process, sampled every 50 ms while running."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--searches", type=int, default=25, help="searches per client per load-test round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of the throughput phase")
    ap.add_argument("--index-size", type=int, default=400)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=0, help="the server's --workers (0: its default)")
    ap.add_argument("--runtime", default="auto", help="the server's --runtime (and the bare forward's)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import httpx
    import torch

    from guie.models import create_embedder, save_embedder
    from guie.search.encoder import describe_model
    from guie.search.image_index import ImageIndex
    from guie.search.ingest import add_source

    report: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "clients": args.clients}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = images(max(args.index_size, 64), tmp)
        torch.manual_seed(0)
        model_path = save_embedder(create_embedder(embed_dim=64), tmp / "model.pt")
        from guie.models import load_embedder

        embedder = load_embedder(model_path).eval()
        home = tmp / "indexes"
        os.environ["GUIE_INDEX_HOME"] = str(home)
        import pandas as pd

        pd.DataFrame({"path": [str(p) for p in files[:args.index_size]]}).to_csv(tmp / "m.csv", index=False)
        with ImageIndex.create("bench", dim=64, model=describe_model(embedder, model_path)) as index:
            add_source(index, tmp / "m.csv", embedder, progress=False)
        del embedder

        # measured again after the served phase: the load may change
        before = bare_rates(model_path, files, runtime=args.runtime, precision=args.precision)
        emit({"phase": "bare (before)", **{k: round(v, 1) for k, v in before.items()}})

        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        server = subprocess.Popen([sys.executable, "-m", "guie.cli", "serve", "bench", "--port", str(port),
                                   "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
                                   "--workers", str(args.workers), "--runtime", args.runtime,
                                   "--precision", args.precision],
                                  env={**os.environ, "GUIE_API_KEY": KEY}, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if httpx.get(url + "health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            else:
                raise SystemExit("server did not start: " + server.stderr.read()[-2000:])
            payloads = [p.read_bytes() for p in files[:64]]

            def search(client: httpx.Client, i: int) -> tuple[int, float]:
                t = time.perf_counter()
                r = client.post(url + "search", data={"k": "5"}, headers={"X-API-Key": KEY},
                                files=[("files", ("q.png", payloads[i % len(payloads)], "image/png"))])
                return r.status_code, time.perf_counter() - t

            # 2. throughput with dynamic batching. The clients share the server's 2 cores, so they are kept light:
            # pre-encoded multipart bodies over http.client (httpx costs ~1 ms of CPU per request here).
            import http.client

            bodies = [multipart(p, "q.png") for p in payloads]
            for _ in range(2):  # warm-up
                search(httpx.Client(timeout=60), 0)
            import psutil

            report["rss_at_rest_mb"] = round(psutil.Process(server.pid).memory_info().rss / 2**20, 1)
            emit({"phase": "at rest", "rss_mb": report["rss_at_rest_mb"]})
            done = [0] * args.clients
            stop_at = time.perf_counter() + args.seconds

            def throughput_client(c: int):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                i = c
                while time.perf_counter() < stop_at:
                    body, ctype = bodies[i % len(bodies)]
                    conn.request("POST", "/search", body=body, headers={"Content-Type": ctype, "X-API-Key": KEY})
                    resp = conn.getresponse()
                    resp.read()
                    done[c] += resp.status == 200
                    i += args.clients
                conn.close()

            t0, server_cpu0, client_cpu0 = time.perf_counter(), cpu_seconds(server.pid), cpu_seconds(os.getpid())
            with RssSampler(server.pid) as load_rss, ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(throughput_client, range(args.clients)))
            wall = time.perf_counter() - t0
            report["rss_under_load_mb"] = round(load_rss.peak / 2**20, 1)
            served = sum(done) / wall
            server_cores = (cpu_seconds(server.pid) - server_cpu0) / wall
            client_cores = (cpu_seconds(os.getpid()) - client_cpu0) / wall
            health = httpx.get(url + "health", headers={"X-API-Key": KEY}).json()
            after = bare_rates(model_path, files, runtime=args.runtime, precision=args.precision)
            emit({"phase": "bare (after)", **{k: round(v, 1) for k, v in after.items()}})
            bare = {b: (before[b] + after[b]) / 2 for b in before}
            best = max(bare.values())
            report["bare_img_per_s"] = {k: round(v, 1) for k, v in bare.items()}
            report["served_img_per_s"] = round(served, 1)
            report["ratio_to_best_bare"] = round(served / best, 3)
            report["ratio_to_bare_at_8"] = round(served / bare["8"], 3)
            report["cpu_cores"] = {"server": round(server_cores, 2), "clients": round(client_cores, 2)}
            emit({"phase": "served", "img_per_s": round(served, 1), "ratio_to_best_bare": report["ratio_to_best_bare"],
                  "ratio_to_bare_at_8": report["ratio_to_bare_at_8"], "cpu_cores": report["cpu_cores"],
                  "peak_rss_mb": report["rss_under_load_mb"],
                  "batching": health.get("batching")})

            # 3. load test
            from PIL import Image

            rounds = []
            for r in range(args.rounds):
                statuses: dict[int, int] = {}
                latencies: list[float] = []
                lock = threading.Lock()

                def load_client(c: int, r=r):
                    with httpx.Client(timeout=60) as client:
                        for j in range(args.searches):
                            status, dt = search(client, c * args.searches + j)
                            with lock:
                                statuses[status] = statuses.get(status, 0) + 1
                                latencies.append(dt)
                        buf = io.BytesIO()
                        Image.fromarray(np.full((32, 32, 3), (r * 37 + c * 11) % 256, np.uint8)).save(buf, "PNG")
                        added = client.post(url + "items", headers={"X-API-Key": KEY},
                                            files=[("files", (f"new{r}-{c}.png", buf.getvalue(), "image/png"))])
                        with lock:
                            statuses[added.status_code] = statuses.get(added.status_code, 0) + 1
                        if added.status_code == 200:
                            item = added.json()["items"][0]["id"]
                            gone = client.delete(url + f"items/{item}", headers={"X-API-Key": KEY})
                            with lock:
                                statuses[gone.status_code] = statuses.get(gone.status_code, 0) + 1

                with RssSampler(server.pid) as rss, ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(load_client, range(args.clients)))
                row = {"phase": "load", "round": r + 1, "requests": sum(statuses.values()),
                       "status": {str(k): v for k, v in sorted(statuses.items())},
                       "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
                       "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1),
                       "peak_rss_mb": round(rss.peak / 2**20, 1)}
                emit(row)
                rounds.append(row)
            report["load"] = rounds

            # 4. burst: far more images than the queue holds, all at once
            big = [("files", (f"b{i}.png", payloads[i], "image/png")) for i in range(8)]

            def burst_one(_):
                with httpx.Client(timeout=60) as client:
                    return client.post(url + "search", data={"k": "5"}, headers={"X-API-Key": KEY},
                                       files=big).status_code

            with ThreadPoolExecutor(64) as pool:
                codes = list(pool.map(burst_one, range(64)))
            after = search(httpx.Client(timeout=60), 0)[0]
            report["burst"] = {"requests": 64, "status": {str(c): codes.count(c) for c in sorted(set(codes))},
                               "after": after}
            emit({"phase": "burst", **report["burst"]})
            report["batching_after_throughput_phase"] = health.get("batching")
        finally:
            server.terminate()
            server.wait(30)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
