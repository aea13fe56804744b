"""The search service with a tiny stand-in encoder (no model): search, items, thumbnails, keys, caps, 503s;
and the dynamic batcher on its own."""
import io
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import png_header_only
from guie.embedding.batching import DynamicBatcher, Overloaded
from guie.search.app import ServerSettings, create_app, safe_name
from guie.search.image_index import ImageIndex, NewItem

KEY = "s3cret-key-for-tests"


class PixelEncoder:
    """Embeds an image as its 4x4 RGB thumbnail (48-d): same picture -> same vector, through a real batcher."""

    fingerprint = "pixels-4x4"

    def __init__(self, **batcher):
        self.batcher = DynamicBatcher(lambda x: x.float().flatten(1).numpy() / 255.0, **batcher)

    def transform(self, image):
        return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.uint8).copy()).permute(2, 0, 1)

    def expect(self):
        return self.batcher.expect()

    def submit(self, images, prepare=None, finish=None, ticket=None):
        return self.batcher.submit(images, prepare, finish, ticket)



def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
        (40, 40), Image.NEAREST)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def served(tmp_path):
    """An index of 12 pictures (labels 0-3, vendors a/b) under an image root, and a factory for clients."""
    root = tmp_path / "images"
    root.mkdir()
    encoder = PixelEncoder()
    index = ImageIndex.create(tmp_path / "idx", dim=48, model={"ref": "pixels", "fingerprint": encoder.fingerprint},
                              image_root=root)
    items, pics = [], []
    for i in range(12):
        pic = picture(i)
        pic.save(root / f"p{i}.png")
        pics.append(pic)
        items.append(NewItem(f"h{i}", f"p{i}.png", str(i % 4), {"vendor": "ab"[i % 2]}))
    items[11] = NewItem("h11", "../outside.png", "3", {"vendor": "b"})  # a path escaping the root: no thumbnail
    (tmp_path / "outside.png").write_bytes(png_bytes(pics[11]))
    vecs = np.stack([encoder.transform(p).float().flatten().numpy() / 255.0 for p in pics])
    index.add(vecs, items)

    def client(**settings):
        return TestClient(create_app(index, encoder, ServerSettings(**settings)))

    yield index, pics, client
    encoder.batcher.close()
    index.close()


def test_search_by_upload_and_by_item_with_thumbnails_and_no_paths(served):
    index, pics, client = served
    c = client()
    assert c.get("/").text.startswith("<!doctype html>") and "app.js" in c.get("/").text
    assert c.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/static/../../app.py").status_code == 404
    r = c.post("/search", data={"k": "3"}, files=[("files", ("<b>x</b>.png", png_bytes(pics[5]), "image/png"))])
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["query"] == "upload 1 (b_.png)"  # the client's name is never echoed raw
    assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-content-type-options"] == "nosniff"
    assert [h["id"] for h in res["hits"]][0] == 5 and res["hits"][0]["distance"] == pytest.approx(0, abs=1e-6)
    assert res["hits"][0]["metadata"] == {"vendor": "b"} and "path" not in r.text and "p5.png" not in r.text
    filtered = c.post("/search", data={"item": "5", "k": "12", "where": "vendor=a"}).json()["results"][0]["hits"]
    assert len(filtered) == 6 and all(h["metadata"]["vendor"] == "a" for h in filtered)
    thumb = c.get("/items/5/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(thumb.content)).size == (40, 40)
    assert c.get("/items/11/thumbnail").status_code == 404  # "../outside.png" is not under the image root
    assert c.get("/items/5").json() == {"id": 5, "label": "1", "added_seq": 1, "metadata": {"vendor": "b"},
                                        "thumbnail": "items/5/thumbnail"}
    assert c.get("/items/99").status_code == 404
    assert c.get("/health").json()["items"] == 12
    assert c.post("/search", data={"k": "3"}).status_code == 400  # neither files nor item
    assert c.post("/search", data={"item": "1", "k": "1000"}).status_code == 422


def test_keys_guard_writes_always_and_reads_off_loopback(served):
    index, pics, client = served
    with pytest.raises(ValueError, match="needs an API key"):
        client(host="0.0.0.0")
    upload = [("files", ("new.png", png_bytes(picture(100)), "image/png"))]
    open_reads = client()
    assert open_reads.post("/items", files=upload).status_code == 403  # no key configured: no writes at all
    assert open_reads.delete("/items/1").status_code == 403
    exposed = client(host="0.0.0.0", api_key=KEY)
    assert exposed.get("/health").json() == {"status": "ok"}  # liveness only, without the key
    assert exposed.post("/search", data={"item": "1"}).status_code == 401
    assert exposed.get("/items/1").status_code == 401 and exposed.get("/items/1/thumbnail").status_code == 401
    assert exposed.get("/").status_code == 200  # the page itself is static; it asks for the key
    good = {"X-API-Key": KEY}
    assert exposed.post("/search", data={"item": "1"}, headers={"X-API-Key": "wrong-key-123"}).status_code == 401
    assert exposed.post("/search", data={"item": "1"}, headers=good).status_code == 200
    assert exposed.get("/health", headers={"Authorization": f"Bearer {KEY}"}).json()["items"] == 12
    assert exposed.post("/items", files=upload).status_code == 401
    added = exposed.post("/items", files=upload, data={"label": "new", "metadata": '{"vendor": "c"}'}, headers=good)
    assert added.status_code == 200, added.text
    new_id = added.json()["items"][0]["id"]
    assert new_id == 12 and not added.json()["items"][0]["duplicate"]
    again = exposed.post("/items", files=upload, headers=good).json()["items"][0]
    assert again == {"query": "upload 1 (new.png)", "id": 12, "duplicate": True}
    assert exposed.get(f"/items/{new_id}/thumbnail", headers=good).status_code == 200  # stored in the index
    assert exposed.delete(f"/items/{new_id}", headers=good).json()["removed"] == [new_id]
    assert exposed.delete(f"/items/{new_id}", headers=good).status_code == 404
    assert len(index) == 12
    assert "access-control-allow-origin" not in exposed.get("/", headers={"Origin": "http://elsewhere"}).headers
    cors = client(cors_origins=["http://elsewhere"])
    assert cors.get("/", headers={"Origin": "http://elsewhere"}).headers["access-control-allow-origin"] == \
        "http://elsewhere"


def test_uploads_are_capped_in_bytes_files_and_pixels(served, tmp_path):
    index, pics, client = served
    c = client(max_upload_bytes=20_000, max_files=2, max_pixels=100_000)
    png = png_bytes(pics[0])
    r = c.post("/search", files=[("files", (f"{i}.png", png, "image/png")) for i in range(3)])
    assert r.status_code in (400, 413) and ("3 files" in r.text or "Too many files" in r.text)
    big = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)))
    assert 20_000 < len(big) < 100_000  # over the per-file cap, under the request cap
    r = c.post("/search", files=[("files", ("big.png", big, "image/png"))])
    assert r.status_code == 413 and "larger than 20,000 bytes" in r.text
    multipart = {"content-type": "multipart/form-data; boundary=zz"}
    r = c.post("/search", content=b"x" * 200_000, headers=multipart)
    assert r.status_code == 413 and "request body larger" in r.text  # declared length: refused before reading
    assert r.headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in r.headers[
        "content-security-policy"]  # security headers on refusals too
    r = c.post("/search", content=iter([b"x" * 50_000] * 4), headers=multipart)
    assert r.status_code == 413 and "request body larger" in r.text  # chunked: refused once the count passes
    bomb = png_header_only(tmp_path / "bomb.png", 1000, 1000).read_bytes()
    r = c.post("/search", files=[("files", ("bomb.png", bomb, "image/png"))])
    assert r.status_code == 400 and "too large" in r.text and "upload 1 (bomb.png)" in r.text
    r = c.post("/search", files=[("files", ("../../etc/passwd", b"root:x:0:0", "image/png"))])
    assert r.status_code == 400 and "not a recognised image format" in r.text and "/etc" not in r.text
    assert safe_name("a/b/..\\c <d>.png", 3) == "upload 3 (c_d_.png)"


def test_a_full_queue_answers_503(served):
    index, pics, client = served

    full = PixelEncoder()

    def refuse(images, prepare=None, finish=None, ticket=None):
        raise Overloaded("busy: 128 images already queued")

    full.submit = refuse
    c = TestClient(create_app(index, full, ServerSettings()))
    r = c.post("/search", files=[("files", ("a.png", png_bytes(pics[0]), "image/png"))])
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
    full.batcher.close()
    r = client(max_inflight=0).post("/search", data={"item": "1"})  # no free slot: refused before any work
    assert r.status_code == 503 and "in flight" in r.text


def test_dynamic_batcher_merges_concurrent_requests_and_bounds_its_queue():
    calls, started, gate = [], threading.Event(), threading.Event()

    def forward(x):
        started.set()
        gate.wait(5)
        calls.append(len(x))
        return x.float().flatten(1).numpy()

    batcher = DynamicBatcher(forward, max_batch=8, max_wait_ms=50, max_queue=10)
    first = batcher.submit(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))  # taken alone, then blocks in forward
    assert started.wait(5)                                                # ... in forward now
    waiting = [batcher.submit(torch.full((2, 3, 2, 2), i, dtype=torch.uint8)) for i in range(4)]  # 8 images
    with pytest.raises(Overloaded, match="limit 10"):
        batcher.submit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8))
    gate.set()
    assert first.result(5).shape == (1, 12)
    for i, f in enumerate(waiting):
        assert (f.result(5) == i).all() and f.result().shape == (2, 12)
    assert calls == [1, 8] and batcher.stats.forwards == 2 and batcher.stats.refused == 1
    boom = DynamicBatcher(lambda x: 1 / 0, max_batch=2, max_queue=4)
    with pytest.raises(ZeroDivisionError):
        boom.embed(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), timeout=5)
    batcher.close()
    boom.close()


def test_dynamic_batcher_workers_run_forwards_side_by_side_and_isolate_request_failures():
    both_running = threading.Barrier(2, timeout=5)

    def forward(x):
        both_running.wait()  # passes only when two forwards run at once
        return x.float().flatten(1).numpy()

    batcher = DynamicBatcher(forward, max_batch=1, max_wait_ms=0, max_queue=4, workers=2)
    pair = [batcher.submit(torch.full((1, 3, 1, 1), i, dtype=torch.uint8)) for i in range(2)]
    assert [float(f.result(5)[0, 0]) for f in pair] == [0.0, 1.0]
    batcher.close()

    def bad_picture():
        raise ValueError("upload 2: not an image")

    merged = DynamicBatcher(lambda x: x.float().flatten(1).numpy(), max_batch=8, max_wait_ms=300, max_queue=8)
    ok = merged.submit(2, prepare=lambda: torch.ones(2, 3, 1, 1, dtype=torch.uint8), finish=lambda rows: rows.sum())
    bad = merged.submit(1, prepare=bad_picture)
    wrong = merged.submit(1, finish=lambda rows: 1 / 0, prepare=lambda: torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    assert ok.result(5) == 6.0  # prepared and finished in the worker; the others' failures did not reach it
    with pytest.raises(ValueError, match="upload 2"):
        bad.result(5)
    with pytest.raises(ZeroDivisionError):
        wrong.result(5)
    assert merged.stats.forwards == 1 and merged.stats.images == 3
    merged.close()


def test_dynamic_batcher_waits_for_announced_requests_only():
    sizes = []

    def forward(x):
        sizes.append(len(x))
        return x.float().flatten(1).numpy()

    batcher = DynamicBatcher(forward, max_batch=8, max_wait_ms=3000, max_queue=8)
    with batcher.expect() as late:
        with batcher.expect() as early:
            first = batcher.submit(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), ticket=early)
        time.sleep(0.2)  # `late` is still announced: the forward waits for it
        assert not first.done()
        second = batcher.submit(torch.ones(1, 3, 1, 1, dtype=torch.uint8), ticket=late)
    assert first.result(5).shape == second.result(5).shape == (1, 3) and sizes == [2]
    t0 = time.monotonic()
    batcher.submit(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).result(5)  # nothing announced: no waiting
    assert time.monotonic() - t0 < 1.5 and sizes == [2, 1]
    with batcher.expect():
        pass  # a request announced but refused before submitting releases its announcement
    assert batcher.submit(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).result(5).shape == (1, 3)
    batcher.close()
