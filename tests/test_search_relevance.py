"""Issue 30 in the library and the app (a stand-in pixel encoder, no model): the distance cut-off, paging, near-
duplicate groups on a planted set, GET /metrics after a small load, and bad input to each (422, never a 500)."""
import math

import numpy as np
import pytest
from PIL import Image

from guie.search.image_index import ImageIndex, NewItem, SearchIndexError
from test_search_server import KEY, PixelEncoder, picture, png_bytes


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def ranked(tmp_path):
    """An index of 40 unit vectors, 4 of them exact copies of item 0's vector (ties)."""
    rng = np.random.default_rng(0)
    vecs = unit(rng.normal(size=(40, 16)))
    vecs[[7, 13, 21, 33]] = vecs[0]
    index = ImageIndex.create(tmp_path / "idx", dim=16, model={"ref": "x", "fingerprint": "x"})
    index.add(vecs, [NewItem(f"h{i}", f"p{i}.png", str(i % 3), {}) for i in range(40)])
    yield index, vecs
    index.close()


def test_pages_are_slices_of_one_ranking_and_the_cutoff_keeps_only_close_hits(ranked):
    index, vecs = ranked
    q = vecs[:1]
    everything = index.search(q, 40)[0]
    assert [h.id for h in everything[:5]] == [0, 7, 13, 21, 33]  # ties (distance 0) in id order
    pages = [index.search(q, 6, offset=o)[0] for o in range(0, 48, 6)]
    assert [h.id for p in pages for h in p] == [h.id for h in everything]
    assert pages[-1] == [] and len(pages[-2]) == 4
    assert [h.id for h in index.search(q, 6, offset=6)[0]] == [h.id for h in pages[1]]  # stable
    filtered = [h.id for o in range(0, 40, 5) for h in index.search(q, 5, where=["label=1"], offset=o)[0]]
    assert filtered == [h.id for h in everything if h.item["label"] == "1"]
    cut = everything[10].distance
    within = index.search(q, 40, max_distance=cut)[0]
    assert [h.id for h in within] == [h.id for h in everything if h.distance <= cut] and len(within) >= 11
    nearest = index.search(-q, 1)[0][0].distance
    assert index.search(-q, 5, max_distance=nearest - 0.01)[0] == []  # nothing within the cut-off: no match
    assert [h.id for h in index.search(q, 3, max_distance=0.0, offset=2)[0]] == [13, 21, 33]
    # plain (not squared) Euclidean: unit vectors are 0..2 apart, |a-b| = sqrt(2 - 2 cos)
    d = everything[-1].distance
    far = vecs[everything[-1].id]
    assert d == pytest.approx(math.sqrt(2 - 2 * float(far @ vecs[0])), abs=1e-5) and 0 < d <= 2
    for bad in (float("nan"), float("inf"), -0.1, "x"):
        with pytest.raises(SearchIndexError, match="max_distance"):
            index.search(q, 5, max_distance=bad)
    with pytest.raises(SearchIndexError, match="offset"):
        index.search(q, 5, offset=-1)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_pages_through_ties_are_stable_on_every_kind(tmp_path, kind):
    """Ten items at exactly the same distance, paged two at a time: a graph walk returns an arbitrary subset of
    tied items, so the search fetches past the page until the ties end (hnsw gave 250, 120 on every page)."""
    rng = np.random.default_rng(0)
    vecs = unit(rng.normal(size=(300, 16)))
    vecs[[7, 13, 21, 33, 50, 80, 120, 200, 250]] = vecs[0]
    with ImageIndex.create(tmp_path / kind, dim=16, model={"ref": "x", "fingerprint": "x"}, kind=kind) as index:
        index.add(vecs, [NewItem(f"h{i}", None, None, {}) for i in range(300)])
        paged = [h.id for o in range(0, 12, 2) for h in index.search(vecs[:1], 2, offset=o)[0]]
        assert paged[:10] == [0, 7, 13, 21, 33, 50, 80, 120, 200, 250]
        assert paged == [h.id for h in index.search(vecs[:1], 12)[0]]


def test_duplicate_groups_join_planted_copies_in_bounded_chunks(ranked, tmp_path):
    index, vecs = ranked
    rng = np.random.default_rng(1)
    near = unit(vecs[[1, 1, 2, 5]] + rng.normal(scale=0.01, size=(4, 16)))  # two copies of 1, one of 2 and of 5
    index.add(near, [NewItem(f"n{i}", f"n{i}.png", "copy", {}) for i in range(4)])  # ids 40-43
    groups = index.duplicate_groups(0.1, neighbours=2, chunk=7)  # small chunks and k: groups still join
    ids = [[h.id for h in g] for g in groups]
    assert ids == [[0, 7, 13, 21, 33], [1, 40, 41], [2, 42], [5, 43]]
    assert groups[0][0].distance == 0 and all(h.distance < 0.1 for g in groups for h in g)
    assert [[h.id for h in g] for g in index.duplicate_groups(0.0)] == [[0, 7, 13, 21, 33]]
    with pytest.raises(SearchIndexError, match="max_distance"):
        index.duplicate_groups(float("nan"))
    with pytest.raises(SearchIndexError, match="linkage"):
        index.duplicate_groups(0.1, linkage="complete")


def test_star_groups_do_not_chain_a_dense_run_of_distinct_items(tmp_path):
    """Twelve items along an arc, each 0.08 from the next: single linkage at 0.1 chains all twelve into one group
    (the ends 0.85 apart); star groups keep every member within 0.1 of its group's first."""
    angles = np.arange(12) * 0.08
    vecs = np.zeros((12, 4), np.float32)
    vecs[:, 0], vecs[:, 1] = np.cos(angles), np.sin(angles)
    with ImageIndex.create(tmp_path / "arc", dim=4, model={"ref": "x", "fingerprint": "x"}) as index:
        index.add(vecs, [NewItem(f"h{i}", None, None, {}) for i in range(12)])
        single = index.duplicate_groups(0.1, linkage="single")
        assert [[h.id for h in g] for g in single] == [list(range(12))] and single[0][-1].distance > 0.8
        star = index.duplicate_groups(0.1)
        assert [[h.id for h in g] for g in star] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
        assert all(h.distance <= 0.1 for g in star for h in g)


def planted_images(root, originals: int = 12):
    """Smooth generated pictures and, for a third of them each, a JPEG re-encode, a half-size resize and a 6%
    crop: the planted near-duplicates. Returns (paths, the original each path is a copy of)."""
    from conftest import photo

    root.mkdir(parents=True, exist_ok=True)
    paths, source = [], []
    for i in range(originals):
        im = Image.fromarray(photo(96, 96, seed=500 + i))
        p = root / f"orig{i}.png"
        im.save(p)
        paths.append(p)
        source.append(i)
        copy = root / f"copy{i}"
        if i % 3 == 0:
            im.save(copy.with_suffix(".jpg"), quality=70)
        elif i % 3 == 1:
            im.resize((48, 48), Image.BILINEAR).save(copy.with_suffix(".png"))
        else:
            im.crop((3, 3, 93, 93)).save(copy.with_suffix(".png"))
        paths.append(next(root.glob(f"copy{i}.*")))
        source.append(i)
    return paths, source


def test_planted_re_encodes_resizes_and_crops_are_grouped(tmp_path):
    """Generated images with re-encoded, resized and cropped copies, embedded as normalised 8x8 grey thumbnails
    (a stand-in model): every planted pair is one group and no two originals are joined."""
    paths, source = planted_images(tmp_path / "planted")

    def embed(p):
        g = np.asarray(Image.open(p).convert("L").resize((8, 8), Image.BOX), np.float32).ravel()
        return g - g.mean()

    vecs = unit(np.stack([embed(p) for p in paths]))
    with ImageIndex.create(tmp_path / "dup", dim=64, model={"ref": "x", "fingerprint": "x"}) as index:
        index.add(vecs, [NewItem(f"h{i}", p.name, str(s), {}) for i, (p, s) in enumerate(zip(paths, source))])
        groups = index.duplicate_groups(0.2)
        found = sorted(sorted(h.item["path"] for h in g) for g in groups)
    assert found == sorted(sorted([f"orig{i}.png", p.name]) for i, p in enumerate(paths[1::2])), found


@pytest.fixture
def app_client(tmp_path):
    """The app over 12 pictures (and 2 near-copies) with a key, through the pixel encoder; a TestClient factory."""
    from fastapi.testclient import TestClient

    from guie.search.app import ServerSettings, create_app

    encoder = PixelEncoder()
    index = ImageIndex.create(tmp_path / "idx", dim=48, model={"ref": "pixels", "fingerprint": encoder.fingerprint})
    pics = [picture(i) for i in range(12)]
    vecs = [encoder.transform(p).float().flatten().numpy() / 255.0 for p in pics]
    vecs += [vecs[3] + 0.01, vecs[3] - 0.01]  # ids 12, 13: near-copies of 3
    items = [NewItem(f"h{i}", f"p{i}.png", str(i % 4), {"vendor": "ab"[i % 2]}) for i in range(14)]
    index.add(np.stack(vecs), items)

    def client(**settings):
        return TestClient(create_app(index, encoder, ServerSettings(api_key=KEY, **settings)),
                          base_url="http://127.0.0.1", headers={"X-API-Key": KEY})

    yield client, pics
    encoder.batcher.close()
    index.close()


def test_http_cutoff_paging_duplicates_and_bad_input(app_client):
    client, pics = app_client
    c = client(max_k=5, max_depth=10)
    full = c.post("/search", data={"item": "3", "k": "5"}).json()
    assert full["offset"] == 0 and full["results"][0]["more"] is True
    ids = [h["id"] for h in full["results"][0]["hits"]]
    assert ids[0] == 3 and set(ids[:3]) == {3, 12, 13}
    seen = []
    for offset in (0, 5):  # k=limit pages up to max_depth
        r = c.post("/search", data={"item": "3", "limit": "5", "offset": str(offset)})
        assert r.status_code == 200, r.text
        seen += [h["id"] for h in r.json()["results"][0]["hits"]]
    assert len(seen) == 10 and seen[:5] == ids and len(set(seen)) == 10
    assert r.json()["results"][0]["more"] is False  # max_depth reached
    upload = [("files", ("q.png", png_bytes(pics[3]), "image/png"))]
    close = c.post("/search", data={"k": "5", "max_distance": "0.1"}, files=upload).json()["results"][0]
    assert sorted(h["id"] for h in close["hits"]) == [3, 12, 13] and close["more"] is False
    assert all(h["distance"] <= 0.1 for h in close["hits"])
    none = c.post("/search", data={"item": "0", "max_distance": "0"}).json()["results"][0]
    assert [h["id"] for h in none["hits"]] == [0]
    bad = {"offset -1": {"offset": "-1"}, "offset past max_depth": {"offset": "6"},
           "huge limit": {"limit": "1000000000"}, "limit 1000": {"limit": "1000"}, "NaN": {"max_distance": "nan"},
           "inf": {"max_distance": "inf"}, "negative": {"max_distance": "-1"}, "text": {"max_distance": "near"},
           "k and limit": {"k": "2", "limit": "3"}}
    for name, fields in bad.items():
        r = c.post("/search", data={"item": "3", **fields})
        assert r.status_code == 422 and "\n" not in r.json()["detail"], (name, r.text)
    groups = c.get("/duplicates", params={"max_distance": "0.1"}).json()
    assert [[h["id"] for h in g] for g in groups["groups"]] == [[3, 12, 13]] and groups["groups_total"] == 1
    assert "path" not in str(groups)
    assert c.get("/duplicates", params={"max_distance": "nan"}).status_code == 422
    assert c.get("/duplicates", params={"limit": "0"}).status_code == 422
    assert c.get("/duplicates", headers={"X-API-Key": "wrong-key-123"}).status_code == 401
    assert c.get("/metrics", headers={"X-API-Key": "wrong-key-123"}).status_code == 401
    with pytest.raises(ValueError, match="max_depth"):
        client(max_k=50, max_depth=10)


def test_metrics_add_up_after_a_small_load(app_client):
    from prometheus_client.parser import text_string_to_metric_families

    client, pics = app_client
    c = client()
    codes = []
    for i in range(6):
        codes.append(c.post("/search", data={"k": "3"},
                            files=[("files", (f"{j}.png", png_bytes(pics[j]), "image/png")) for j in range(i % 3 + 1)]
                            ).status_code)
    codes.append(c.post("/search", data={"item": "1"}).status_code)
    codes.append(c.post("/search", data={"item": "1", "offset": "-1"}).status_code)
    codes.append(c.get("/items/1").status_code)
    codes.append(c.get("/items/999").status_code)
    codes.append(c.get("/no/such/route").status_code)
    codes.append(c.get("/items/1", headers={"X-API-Key": "wrong-key-123"}).status_code)
    text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["guie_http_requests"].samples if s.name == "guie_http_requests_total"]
    by = {}
    for s in requests:
        key = (s.labels["route"], s.labels["status"])
        by[key] = by.get(key, 0) + s.value
    assert sum(by.values()) == len(codes) and by[("/search", "200")] == 7 and by[("/search", "422")] == 1
    assert by[("/items/{id}", "200")] == 1 and by[("/items/{id}", "404")] == 1 and by[("/items/{id}", "401")] == 1
    assert by[("other", "404")] == 1
    latency = {s.labels.get("le"): s.value for s in families["guie_http_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["route"] == "/search"}
    assert latency["+Inf"] == 8
    queries = {s.name: s.value for s in families["guie_search_queries"].samples}
    assert queries["guie_search_queries_count"] == 7 and queries["guie_search_queries_sum"] == 2 * (1 + 2 + 3) + 1
    batches = {(s.name, s.labels.get("le")): s.value for s in families["guie_batch_images"].samples}
    assert batches[("guie_batch_images_sum", None)] == 12  # every uploaded image went through a forward once
    assert batches[("guie_batch_images_count", None)] == batches[("guie_batch_images_bucket", "+Inf")] >= 1
    gauges = {f.name: f.samples[0].value for f in families.values() if f.type == "gauge"}
    assert gauges["guie_index_items"] == 14 and gauges["guie_index_commit"] == 1 and gauges["guie_queue_images"] == 0
    assert families["guie_batch_refused"].samples[0].value == 0


def test_page_assets_carry_the_slider_and_more(app_client):
    client, _ = app_client
    c = client()
    page = c.get("/").text
    assert 'id="max-distance"' in page and 'id="more"' in page and 'id="no-match"' in page
    assert "max_distance" in c.get("/static/app.js").text


def test_the_client_times_out_on_a_silent_server_and_reads_retry_after_dates():
    """A server that accepts the connection and never answers: one ClientError line after the timeout."""
    import email.utils
    import socket
    import time

    from guie.client import Client, ClientError, retry_after_seconds

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with Client(f"http://127.0.0.1:{port}", api_key=KEY, timeout=0.5) as c, \
                pytest.raises(ClientError, match="no answer within 0.5 s") as e:
            c.stats()
        assert time.monotonic() - t0 < 5 and e.value.status is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after_seconds(later) <= 30 and retry_after_seconds("-3") == 0
    with pytest.raises(ClientError, match="timeout"):
        Client("http://127.0.0.1:1", timeout=0)
    with pytest.raises(ClientError, match="images or ids"):
        Client("http://127.0.0.1:1").search()
