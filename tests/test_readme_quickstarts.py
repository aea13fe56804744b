"""The README's three quick starts, run command by command as a user would paste them, on a tiny folder of photos.

Each `<!-- quickstart: NAME -->` block of README.md is read from the file (so the README cannot drift from what
works), run with `bash` in one scratch folder that holds `my-photos/<object>/<images>` and `query.jpg`, with the
venv's `guie` first on PATH. `guie serve` is started in the background, asked for its page and a search, then
stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
OBJECTS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "cat", "coins"]


def quickstart_commands(name: str) -> list[str]:
    """The commands of README block `<!-- quickstart: name -->`, backslash continuations joined."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- quickstart: {name} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no quickstart block {name!r}"
    joined = m.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """my-photos/<object>/{0..3}.jpg: four crops (two mirrored) of each of ten scikit-image photos; query.jpg."""
    from skimage import data

    root = tmp_path_factory.mktemp("quickstart")
    for name in OBJECTS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        folder = root / "my-photos" / name
        folder.mkdir(parents=True)
        w, h = img.size
        for i in range(4):
            rng = np.random.default_rng(i)
            left, top = int(rng.uniform(0, 0.15) * w), int(rng.uniform(0, 0.15) * h)
            crop = img.crop((left, top, left + int(0.8 * w), top + int(0.8 * h)))
            (ImageOps.mirror(crop) if i % 2 else crop).save(folder / f"{i}.jpg", quality=85)
    shutil.copy(root / "my-photos" / "coffee" / "2.jpg", root / "query.jpg")
    return root


@pytest.fixture(scope="module")
def env(workdir) -> dict[str, str]:
    """The venv's bin first on PATH; indexes and caches inside the scratch folder."""
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["GUIE_INDEX_HOME"] = str(workdir / "indexes")
    e["GUIE_CACHE"] = str(workdir / "cache")
    e.pop("GUIE_API_KEY", None)
    return e


def run(cmd: str, cwd: Path, env: dict[str, str]) -> str:
    """Run one README command; fail with its output when it fails."""
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"`{cmd}` exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def serve_and_search(cmd: str, cwd: Path, env: dict[str, str]) -> dict:
    """Start the README's `guie serve` on a free port, search it with query.jpg, stop it; the search's JSON."""
    port = _free_port()
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd} --port {port}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"`{cmd}` did not come up: {proc.stdout.read().decode()[-3000:]}") from None
                time.sleep(0.5)
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            assert "<html" in r.read().decode().lower()
        body = (cwd / "query.jpg").read_bytes()
        boundary = "quickstartboundary"
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n"
                   f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"query.jpg\"\r\n"
                   "Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(base + "/search", data=payload, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_quickstart_search_your_images(workdir, env):
    """Create, add, search and serve: the query (a copy of coffee/2.jpg) finds that photo first, at distance 0."""
    out, served = "", None
    for cmd in quickstart_commands("search"):
        if cmd.split()[:2] == ["guie", "serve"]:
            served = serve_and_search(cmd.split("#")[0].strip(), workdir, env)
        else:
            out += run(cmd, workdir, env)
    first = next(line for line in out.splitlines() if "coffee" in line)
    _, distance, label, path = first.split()
    assert (float(distance), label, path) == (0.0, "coffee", "coffee/2.jpg"), out[-2000:]
    assert served is not None, "the search quick start starts `guie serve`"
    hits = served["results"][0]["hits"]
    assert len(hits) == 3 and hits[0]["distance"] < 1e-4 and "coffee" in json.dumps(hits[0]), served


def test_quickstart_train_on_your_data(workdir, env):
    """Import, build, train, evaluate: a model file and two scored reports on the held-out classes."""
    out = "".join(run(cmd, workdir, env) for cmd in quickstart_commands("train"))
    assert (workdir / "runs" / "my-images-lite0-cpu" / "model.pt").is_file()
    scores = [float(s) for s in re.findall(r"mP@5[^0-9]*([01]\.\d+)", out)]
    assert len(scores) >= 2 and all(0 <= s <= 1 for s in scores), out[-2000:]
    assert (workdir / "reports" / "trained").is_dir() and (workdir / "reports" / "zero-shot").is_dir()


def test_quickstart_build_and_check_a_submission(workdir, env):
    """Export the trained model as a competition file and check it in a clean process."""
    if not (workdir / "runs" / "my-images-lite0-cpu" / "model.pt").is_file():
        pytest.fail("the train quick start did not leave its model (see the test before this one)")
    for cmd in quickstart_commands("submission"):
        run(cmd, workdir, env)
    assert (workdir / "submission.pt").stat().st_size > 1_000_000
