"""The search service with a tiny stand-in encoder (no model): search, items, thumbnails, keys, caps, 503s;
and the dynamic batcher on its own."""
import io
import json
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
from guie.search.http_limits import BodyGuard
from guie.search.image_index import ImageIndex, NewItem

KEY = "s3cret-key-for-tests"
LOCAL = "http://127.0.0.1"  # a Host the loopback server accepts (TestClient's default, testserver, is refused)


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
        return TestClient(create_app(index, encoder, ServerSettings(**settings)), base_url=LOCAL)

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
    assert r.status_code == 413 and "Too many files: at most 2 per request" in r.text  # issue 26 item 17: not 400
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
    c = TestClient(create_app(index, full, ServerSettings()), base_url=LOCAL)
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


def test_a_set_key_guards_every_read_and_loopback_checks_the_host(served):
    """Issue 26 items 1-2: a key set on 127.0.0.1 is needed for every read (the schema too); without a key the
    Host header must name the server (DNS rebinding), with extra names allowed by setting."""
    index, pics, client = served
    keyed = client(api_key=KEY)
    for method, path in [("get", "/items/1"), ("get", "/items/1/thumbnail"), ("get", "/openapi.json")]:
        assert getattr(keyed, method)(path).status_code == 401, path
        assert getattr(keyed, method)(path, headers={"X-API-Key": KEY}).status_code == 200, path
    assert keyed.post("/search", data={"item": "1"}).status_code == 401
    assert keyed.get("/health").json() == {"status": "ok"}
    assert keyed.get("/docs").status_code == 404 and keyed.get("/redoc").status_code == 404
    open_reads = client()
    assert open_reads.get("/items/1").status_code == 200  # keyless loopback: reads open to local clients
    rebound = open_reads.get("/items/1", headers={"Host": "attacker.rebind.example"})
    assert rebound.status_code == 400 and "vendor" not in rebound.text
    assert open_reads.post("/search", data={"item": "1"}, headers={"Host": "evil.example:8000"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert open_reads.get("/items/1", headers={"Host": host}).status_code == 200, host
    lan = client(allowed_hosts=["search.lan", "*.corp.example"])
    assert lan.get("/items/1", headers={"Host": "search.lan:8000"}).status_code == 200
    assert lan.get("/items/1", headers={"Host": "a.corp.example"}).status_code == 200
    assert lan.get("/items/1", headers={"Host": "search.lan.evil.example"}).status_code == 400
    assert client(host="::1").get("/items/1", headers={"Host": "[::1]:8000"}).status_code == 200


def test_settings_and_key_files_are_checked_with_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from guie.cli import app
    from guie.errors import InputError
    from guie.search.auth import read_api_key

    with pytest.raises(InputError, match=r"port 99999 is not a TCP port \(1-65535\)"):
        ServerSettings(port=99999).check()
    with pytest.raises(InputError, match="allowed host 'a\\*b'"):
        ServerSettings(allowed_hosts=["a*b"]).check()
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "none"), "--port", "99999"])
    assert r.exit_code == 2 and r.output.strip() == "error: port 99999 is not a TCP port (1-65535)"
    (tmp_path / "key").write_text(KEY + "\n# comment\n")
    assert read_api_key(None, tmp_path / "key") == KEY
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InputError, match="API key file is empty"):
        read_api_key(None, tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        read_api_key(None, tmp_path / "missing")
    with pytest.raises(InputError, match="not both"):
        read_api_key(KEY, tmp_path / "key")


def test_delete_removes_the_uploaded_bytes_and_nested_metadata_is_json(served):
    """Issue 26 items 11 and 17: DELETE /items/{id} deletes the bytes POST /items stored; nested metadata values
    are stored as JSON text, never Python reprs; a duplicate of an indexed image stores no file."""
    index, pics, client = served
    c, good = client(api_key=KEY), {"X-API-Key": KEY}
    uploads = index.folder / "uploads"
    meta = {"tags": {"colour": ["red", "blue"], "n": 2}, "k" * 300: "long key", "flag": True}
    added = c.post("/items", files=[("files", ("new.png", png_bytes(picture(200)), "image/png"))],
                   data={"metadata": json.dumps(meta)}, headers=good)
    assert added.status_code == 200, added.text
    new_id = added.json()["items"][0]["id"]
    assert len(list(uploads.iterdir())) == 1
    stored = c.get(f"/items/{new_id}", headers=good).json()["metadata"]
    assert stored["tags"] == '{"colour":["red","blue"],"n":2}' and json.loads(stored["tags"]) == meta["tags"]
    assert stored["flag"] is True and stored["k" * 300] == "long key"
    from guie.data.dedup import bytes_digest

    known = png_bytes(picture(300))  # indexed from the image root (as `guie index add` does), then uploaded
    (index.image_root / "known.png").write_bytes(known)
    index.add(np.zeros((1, 48), np.float32), [NewItem(bytes_digest(known), "known.png", "k", {})])
    dup = c.post("/items", files=[("files", ("same.png", known, "image/png"))], headers=good).json()
    assert dup["items"][0] == {"query": "upload 1 (same.png)", "id": new_id + 1, "duplicate": True}
    assert len(list(uploads.iterdir())) == 1  # the duplicate's bytes were not stored a second time
    assert c.delete(f"/items/{new_id}", headers=good).json()["removed"] == [new_id]
    assert list(uploads.iterdir()) == []
    assert c.delete(f"/items/{new_id + 1}", headers=good).status_code == 200
    assert (index.image_root / "known.png").is_file()  # only bytes the server stored are deleted


def test_decode_cost_is_read_from_headers_at_the_jpeg_scale(tmp_path):
    from conftest import png_one_bit
    from guie.search.decode_limits import decode_cost

    buf = io.BytesIO()
    Image.new("RGB", (2048, 1536), (9, 9, 9)).save(buf, "JPEG")
    assert decode_cost(buf.getvalue(), 256) == 512 * 384  # decoded at 1/4: its short side stays >= 256
    assert decode_cost(buf.getvalue(), None) == 2048 * 1536
    png = png_one_bit(tmp_path / "heavy.png", 5700, 5700).read_bytes()
    assert len(png) < 16_000 and decode_cost(png, 256) == 5700 * 5700
    assert decode_cost(b"not an image", 256) == 0


def test_a_full_body_pool_evicts_the_slowest_upload_for_a_new_request(served):
    """Stalled uploads beyond the body pool get 503 at once; once they have stalled for a second, a new request
    that finds the pool full evicts the slowest of them (answered 408 at its next byte) instead of being
    refused."""
    import socket

    import httpx
    import uvicorn

    index, pics, client = served
    encoder = PixelEncoder()
    app = create_app(index, encoder, ServerSettings(max_readers=4, body_grace_s=30))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    stalled = []
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        head = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
                "boundary=zz\r\nContent-Length: 100000\r\n\r\n--zz\r\n").encode()
        for _ in range(16):
            stalled.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            stalled[-1].sendall(head)
        time.sleep(0.3)
        refused, held = [], []
        for s in stalled:
            s.setblocking(False)
            try:
                refused.append(s.recv(64).split(b" ")[1])
            except BlockingIOError:
                held.append(s)
        assert refused == [b"503"] * 12 and len(held) == 4  # the pool holds 4; none has stalled a second yet
        time.sleep(BodyGuard.EVICT_AFTER_S + 0.2)
        for _ in range(4):
            r = httpx.post(f"http://127.0.0.1:{port}/search", data={"item": "1", "k": "2"}, timeout=10)
            assert r.status_code == 200, r.text
        answers = []
        for s in held:  # an evicted upload is answered 408 at its next byte; the others are still waiting
            s.settimeout(3)
            s.sendall(b"x")
            try:
                answers.append(s.recv(64).split(b" ")[1])
            except TimeoutError:
                answers.append(b"waiting")
        assert sorted(answers) == [b"408"] + [b"waiting"] * 3  # the first search evicted one; then there was room
    finally:
        for s in stalled:
            s.close()
        server.should_exit = True
        thread.join(10)
        encoder.batcher.close()
