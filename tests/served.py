"""A real `guie serve` process for tests that need one (the client, the page's cut-off and paging): an index of
generated images under a tiny random model, a key from a key file, 127.0.0.1 only. Share one per module
(a module-scoped fixture): starting it costs an interpreter and a model load."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import write_labelled_folder

KEY = "a-client-test-key-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedIndex:
    """`python -m guie.cli serve` over `tmp/idx` (4 classes x 3 noisy variants: 12 PNGs under `tmp/imgs`, an 8-d
    tiny model), started with `extra` arguments; its stdout and stderr in `tmp/server.log`."""

    def __init__(self, tmp: Path, extra: tuple[str, ...] = (), classes: int = 4):
        from guie.models import create_embedder, save_embedder
        from guie.search.encoder import describe_model
        from guie.search.image_index import ImageIndex
        from guie.search.ingest import add_source

        self.images = write_labelled_folder(tmp / "imgs", classes=classes, domains=("a", "b", "c"))
        model = create_embedder("timm:test_efficientnet", embed_dim=8, pretrained=False, image_size=32).eval()
        self.model_path = save_embedder(model, tmp / "tiny.pt")
        self.index_path = tmp / "idx"
        with ImageIndex.create(self.index_path, dim=8, model=describe_model(model, self.model_path)) as index:
            add_source(index, self.images, model, progress=False)
        (tmp / "key.txt").write_text(KEY + "\n")
        self.port, self.log_path = free_port(), tmp / "server.log"
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {k: v for k, v in os.environ.items() if k != "GUIE_API_KEY"}
        env["PYTHONPATH"] = os.pathsep.join(sys.path)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "guie.cli", "serve", str(self.index_path), "--port",
                                      str(self.port), "--api-key-file", str(tmp / "key.txt"), *extra], env=env,
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 120
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert self.proc.poll() is None, self.log_text()

    def log_text(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
