"""End to end: `guie index` (create, add two vendors, search with a third vendor's image, remove one vendor, search
again), the same answers from `guie serve`'s HTTP API and from its page driven in real headless chromium, and a
real kill -9 during `guie index add`.

Runs on generated images everywhere and on the real emoji images where `guie data emoji` has built them.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import write_labelled_folder
from guie.cli import app

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT_ENV = "GUIE_SEARCH_SCREENSHOT"  # set to a path to keep the page's screenshot (docs/search-page.png)
LONG_KEY = "a_metadata_column_with_a_very_long_name_and_no_spaces_" * 2  # must wrap inside its card


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def index_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("indexes")
    old = os.environ.get("GUIE_INDEX_HOME")
    os.environ["GUIE_INDEX_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("GUIE_INDEX_HOME")
    else:
        os.environ["GUIE_INDEX_HOME"] = old


def generated_set(tmp: Path, tiny_embedder) -> dict:
    """6 classes drawn by 3 'vendors' (small pixel noise apart) and a tiny random model saved to a file."""
    from guie.models import save_embedder

    root = write_labelled_folder(tmp / "gen", classes=6, domains=("apple", "google", "twitter"))
    paths = sorted(root.rglob("*.png"))
    manifest = pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths],
                             "vendor": [p.stem.split("_")[0] for p in paths], LONG_KEY: "long"})
    manifest.to_csv(tmp / "gen.csv", index=False)
    model = save_embedder(tiny_embedder(embed_dim=8, image_size=32), tmp / "tiny.pt")
    return {"manifest": tmp / "gen.csv", "model": model, "size": [], "label": "class2",
            "query": root / "class2" / "twitter_2.png"}


def emoji_set(tmp: Path, manifest: Path) -> dict:
    """12 emoji drawn by all four vendors; EfficientNet-Lite0's pooled features at 64 px."""
    m = pd.read_csv(manifest, dtype={"label": str})
    m = m[m["split"] == "test"]
    labels = sorted(m.groupby("label")["vendor"].nunique().loc[lambda s: s == 4].index)[:12]
    sub = m[m["label"].isin(labels)].copy()
    sub["path"] = [str(manifest.parent / p) for p in sub["path"]]
    sub[LONG_KEY] = "long"
    sub.to_csv(tmp / "emoji.csv", index=False)
    label = labels[0]
    return {"manifest": tmp / "emoji.csv", "model": "efficientnet_lite0", "size": ["--image-size", "64"],
            "label": label, "query": Path(sub[(sub["label"] == label) & (sub["vendor"] == "twitter")]["path"].iloc[0])}


@pytest.fixture(params=["generated", "emoji"])
def dataset(request, tmp_path, tiny_embedder):
    if request.param == "emoji":
        return emoji_set(tmp_path, request.getfixturevalue("emoji_manifest")) | {"name": "emoji"}
    return generated_set(tmp_path, tiny_embedder) | {"name": "generated"}


class LiveServer:
    """`guie serve`'s app under uvicorn in a thread on a free loopback port."""

    def __init__(self, name: str):
        import uvicorn

        from guie.search.app import ServerSettings, create_app
        from guie.search.encoder import EngineEncoder, load_index_model
        from guie.search.image_index import ImageIndex

        self.index = ImageIndex.open(name)
        self.encoder = EngineEncoder(load_index_model(self.index), max_wait_ms=2)
        self.key = "a-key-for-tests"
        web = create_app(self.index, self.encoder, ServerSettings(api_key=self.key))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        self.url = f"http://127.0.0.1:{self.port}/"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.encoder.close()
        self.index.close()


def chromium_driver(downloads: Path):
    """Debian's chromium under selenium, headless, with a fresh profile and no network of its own."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing: scripts/setup.sh installs them")
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                f"--user-data-dir={downloads}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_cli_http_and_page_agree(dataset, index_home, tmp_path):
    name = f"e2e-{dataset['name']}"
    cli("index", "create", name, "--model", dataset["model"], *dataset["size"])
    out = cli("index", "add", name, dataset["manifest"], "--where", "vendor=apple,google", "--no-progress")
    assert "added" in out
    n_two_vendors = json.loads(cli("index", "stats", name, "--json"))["items"]
    query = dataset["query"]
    out = cli("index", "search", name, query, "-k", "4", "--json", "--grid", tmp_path / "grid.png")
    first = json.loads(out.splitlines()[0])["results"]
    assert (tmp_path / "grid.png").stat().st_size > 1000  # the query and its results, drawn
    top2 = {(r["label"], r["path"].split("/")[-2 if dataset["name"] == "emoji" else -1].split("_")[0])
            for r in first[:2]}
    assert top2 == {(dataset["label"], "apple"), (dataset["label"], "google")}, first  # the other vendors' drawings
    out = cli("index", "remove", name, "--where", "vendor=google")
    stats = json.loads(cli("index", "stats", name, "--json"))
    assert stats["items"] == n_two_vendors - int(out.split("removed ")[1].split()[0]) and stats["seq"] == 2
    second = json.loads(cli("index", "search", name, query, "-k", "4", "--json").splitlines()[0])["results"]
    assert second[0]["id"] == first[0 if "apple" in first[0]["path"] else 1]["id"]
    assert not any("google" in r["path"] for r in second)

    server = LiveServer(name)
    driver = None
    try:
        with open(query, "rb") as f:
            r = httpx.post(server.url + "search", data={"k": "8"}, files=[("files", ("q.png", f.read()))],
                           headers={"X-API-Key": server.key})
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]["hits"]
        assert [h["id"] for h in hits[:4]] == [s["id"] for s in second]
        assert [h["distance"] for h in hits[:4]] == pytest.approx([s["distance"] for s in second], abs=1e-4)
        assert all("path" not in h and str(query.parent) not in r.text for h in hits)

        driver = chromium_driver(tmp_path / "profile")
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(driver, 20)
        driver.get(server.url)  # a keyed server: the page asks for the key once and keeps it for the tab
        wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        driver.find_element(By.ID, "api-key").send_keys(server.key)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(lambda d: "images" in d.find_element(By.ID, "index-info").text)
        driver.refresh()  # sessionStorage keeps it: no second prompt
        wait.until(lambda d: "images" in d.find_element(By.ID, "index-info").text)
        assert not driver.find_element(By.ID, "key-form").is_displayed()
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("8")
        driver.find_element(By.ID, "file-input").send_keys(str(query))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == len(hits))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .hit")
        assert [int(c.get_attribute("data-id")) for c in cards] == [h["id"] for h in hits]
        assert cards[0].get_attribute("data-label") == dataset["label"] and "apple" in cards[0].text
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                  img) for img in d.find_elements(By.CSS_SELECTOR, ".hit .thumb")))
        broken = driver.execute_script(  # a card whose content overflows it, or a value squeezed out of sight
            "return [...document.querySelectorAll('#results .hit')].filter(c => c.scrollWidth > c.clientWidth + 1"
            " || [...c.querySelectorAll('dd')].some(dd => dd.getBoundingClientRect().width < 30"
            " || dd.getBoundingClientRect().right > c.getBoundingClientRect().right)).length")
        assert broken == 0 and LONG_KEY in cards[0].text.replace("\n", "")
        if os.environ.get(SCREENSHOT_ENV):
            driver.save_screenshot(os.environ[SCREENSHOT_ENV])
        clicked = int(cards[1].get_attribute("data-id"))
        cards[1].click()  # search from a result: it comes back first, at distance 0
        wait.until(lambda d: f"item {clicked}" in d.find_element(By.ID, "query-caption").text
                   and d.find_elements(By.CSS_SELECTOR, "#results .hit")
                   and d.find_elements(By.CSS_SELECTOR, "#results .hit")[0].get_attribute("data-id") == str(clicked))
        first_card = driver.find_elements(By.CSS_SELECTOR, "#results .hit")[0]
        assert "distance 0.000" in first_card.text
        assert "error" not in driver.find_element(By.ID, "status").get_attribute("class")
    finally:
        if driver is not None:
            driver.quit()
        server.close()


def test_kill_9_during_index_add_keeps_the_last_commit_and_a_rerun_finishes(index_home, tmp_path, tiny_embedder,
                                                                           caplog):
    """A real SIGKILL of `guie index add` while it embeds; the index still holds exactly its last commit, and the
    same command run again resumes the finished embedding shards and commits everything."""
    from guie.models import save_embedder
    from guie.search.image_index import ImageIndex, SearchIndexError

    root = write_labelled_folder(tmp_path / "imgs", classes=12, domains=("a", "b", "c"))
    model = save_embedder(tiny_embedder(embed_dim=8, image_size=32), tmp_path / "tiny.pt")
    name = "killed"
    cli("index", "create", name, "--model", model)
    cli("index", "add", name, root / "class0", "--no-progress")  # commit 1: 3 images
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "guie.cli", "index", "add", name, str(root), "--batch-size", "2",
           "--shard-size", "2", "--no-progress"]
    parts = index_home / name / "pending" / "embeddings.parquet.parts"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("part-*.parquet"))) < 3:
        time.sleep(0.01)
    assert proc.poll() is None, "the add finished before it could be killed: " + proc.communicate()[1][-1000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("part-*.parquet")))
    assert 3 <= done < 17  # 33 new images in 2-image shards: killed part-way through
    with ImageIndex.open(name, write=False) as index:
        assert len(index) == 3 and index.seq == 1 and index.stats()["backend"]["vectors"] == 3
    caplog.set_level(logging.INFO, logger="guie")
    out = cli(*cmd[3:])  # the same command again (in this process: no second interpreter start)
    assert any(f"{done}/17 shards already done" in m for m in caplog.messages), caplog.messages  # not redone
    assert "added 33 of 36 images (3 already indexed" in out
    with ImageIndex.open(name) as index:
        assert len(index) == 36 and index.seq == 2 and not (index.folder / "pending").exists()
        from guie.search.encoder import load_index_model

        other = save_embedder(tiny_embedder(embed_dim=8, image_size=32, seed=1), tmp_path / "other.pt")
        with pytest.raises(SearchIndexError, match="fingerprint"):  # the index refuses another model
            load_index_model(index, other)
    (tmp_path / "ids.txt").write_text("0\n5\n999\n")
    assert "removed 2 items in commit 3; 34 items" in cli("index", "remove", name, "--ids", tmp_path / "ids.txt")
    r = CliRunner().invoke(app, ["index", "create", name, "--model", str(model)])
    assert r.exit_code == 2 and "already exists" in r.output
