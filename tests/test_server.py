"""The web server's JSON API, in process with FastAPI's TestClient, on the tiny attention model."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from captioner.model import Captioner  # noqa: E402
from captioner.server import create_app  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "images"
LIMIT = 200_000


@pytest.fixture(scope="module")
def model(tiny_model) -> Captioner:
    return Captioner.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_upload_bytes=LIMIT)) as c:
        yield c


def image(tiny_data, name: str = "red_square_0.jpg") -> bytes:
    return (tiny_data / "images" / name).read_bytes()


def post(client, data: bytes, name: str = "photo.jpg", form: dict | None = None, **params):
    return client.post("/api/caption", files={"file": (name, data, "image/jpeg")}, data=form, params=params)


def test_caption_a_real_image(client, model, tiny_data):
    r = post(client, image(tiny_data))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = model.caption(tiny_data / "images" / "red_square_0.jpg", beam_size=3, n_best=3)
    assert body["caption"] == expected.caption and body["caption"]
    assert [c["caption"] for c in body["captions"]] == [text for text, _ in expected.captions]
    assert all(isinstance(c["score"], float) for c in body["captions"])
    assert set(body["timing"]) >= {"queue_ms", "preprocess_ms", "model_ms", "total_ms"}
    assert all(v >= 0 for v in body["timing"].values())
    assert body["labels"] == [label.to_json() for label in expected.labels] and body["labels"]
    assert body["grounding"] is True


def test_grounding_switch(client, model, tiny_data):
    path = tiny_data / "images" / "red_square_0.jpg"
    for switch, value in (({"grounding": "false"}, False), ({"grounding": "true"}, True)):
        body = post(client, image(tiny_data), form=switch).json()
        assert body["grounding"] is value
        assert body["caption"] == model.caption(path, beam_size=3, n_best=3, grounding=value).caption
    assert post(client, image(tiny_data), grounding="maybe").status_code == 422


def test_attention_payload(client, tiny_data):
    att = post(client, image(tiny_data, "blue_circle_1.jpg")).json()["attention"]
    rows, cols = att["grid"]
    assert rows * cols > 1 and att["words"] and len(att["weights"]) == len(att["words"])
    for row in att["weights"]:
        assert len(row) == rows * cols
        assert all(v == round(v, 4) for v in row)
        assert sum(row) == pytest.approx(1.0, abs=0.01)  # soft attention: a distribution over the grid


def test_options_as_form_fields_or_query_params(client, tiny_data):
    data = image(tiny_data)
    assert len(post(client, data, form={"beam_size": "4", "n_best": "2"}).json()["captions"]) == 2
    body = post(client, data, beam_size=1, n_best=1).json()
    assert (body["beam_size"], body["n_best"], len(body["captions"])) == (1, 1, 1)


@pytest.mark.parametrize(
    "params, form, field",
    [
        ({"beam_size": 0}, None, "beam_size"),
        ({"beam_size": 99}, None, "beam_size"),
        (None, {"n_best": "many"}, "n_best"),
        ({"beam_size": 2, "n_best": 3}, None, "n_best"),
    ],
)
def test_bad_options_are_clear_422s(client, tiny_data, params, form, field):
    r = post(client, image(tiny_data), form=form, **(params or {}))
    assert r.status_code == 422
    assert field in r.text


def test_missing_file_field(client):
    r = client.post("/api/caption", data={"beam_size": "3"})
    assert r.status_code == 422
    assert any(err["loc"][-1] == "file" for err in r.json()["detail"])


@pytest.mark.parametrize(
    "name, status, words",
    [
        ("empty.jpg", 422, "empty"),
        ("not_an_image.jpg", 415, "not a recognised image"),
        ("truncated.jpg", 422, "truncated"),
    ],
)
def test_bad_images_say_what_is_wrong(client, name, status, words):
    r = post(client, (FIXTURES / name).read_bytes(), name=name)
    assert r.status_code == status
    assert r.json()["detail"].startswith(f"{name}: ") and words in r.json()["detail"]


def test_oversized_uploads_get_413(client):
    big = os.urandom(LIMIT + 1)  # just over: the Content-Length passes, the file check refuses
    assert post(client, big).status_code == 413
    huge = os.urandom(4 * LIMIT)  # refused from Content-Length before the body is read
    r = post(client, huge)
    assert r.status_code == 413 and "too large" in r.json()["detail"]


def test_oversized_stream_without_content_length_gets_413(client):
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()

    def chunks():  # a generator body goes out chunked, with no Content-Length to check up front
        yield head
        for _ in range(10):
            yield b"\0" * LIMIT

    r = client.post(
        "/api/caption",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413


def test_healthz_and_openapi(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["encoder"] == "efficientnet_lite0"
    assert health["decoder"] == "attention" and health["uptime_s"] >= 0 and health["search"] is False
    assert set(health["batching"]) >= {"batches", "requests", "mean_batch_size"}
    spec = client.get("/openapi.json").json()
    assert {"/api/caption", "/api/search", "/api/photo", "/healthz"} <= set(spec["paths"])


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="alt"' in page.text and 'aria-live="polite"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "cdn" not in page.text.lower()


def test_search_is_off_without_an_index(client):
    r = client.get("/api/search", params={"q": "red"})
    assert r.status_code == 404 and "--db" in r.json()["detail"]
    assert client.get("/api/photo", params={"path": "/etc/passwd"}).status_code == 404


def test_concurrent_requests_share_batches_and_get_their_own_answers(model, tiny_data):
    names = [f"{c}_{s}_{k}.jpg" for c in ("red", "blue") for s in ("square", "circle") for k in (0, 1)]
    alone = {n: model.caption(tiny_data / "images" / n, beam_size=3, n_best=1).caption for n in names}
    bad = (FIXTURES / "truncated.jpg").read_bytes()
    with TestClient(create_app(model, max_wait_ms=200)) as client:
        barrier = threading.Barrier(len(names) + 1)

        def send(name: str | None):
            barrier.wait()
            if name is None:  # a broken file in the crowd fails alone
                return post(client, bad, name="truncated.jpg")
            return post(client, image(tiny_data, name), n_best=1)

        with ThreadPoolExecutor(len(names) + 1) as pool:
            responses = list(pool.map(send, [*names, None]))
        stats = client.get("/healthz").json()["batching"]
    assert responses[-1].status_code == 422
    assert [r.json()["caption"] for r in responses[:-1]] == [alone[n] for n in names]
    assert stats["requests"] == len(names) and stats["mean_batch_size"] > 1, stats
    assert max(r.json()["batch_size"] for r in responses[:-1]) > 1


def test_different_options_never_share_a_pass(model, tiny_data):
    with TestClient(create_app(model, max_wait_ms=200)) as client:
        barrier = threading.Barrier(6)

        def send(n_best: int):
            barrier.wait()
            return post(client, image(tiny_data), beam_size=3, n_best=n_best).json()

        with ThreadPoolExecutor(6) as pool:
            bodies = list(pool.map(send, [1, 2, 3, 1, 2, 3]))
        stats = client.get("/healthz").json()["batching"]
    assert [len(b["captions"]) for b in bodies] == [1, 2, 3, 1, 2, 3]
    assert stats["batches"] >= 3 and stats["requests"] == 6


def rss_mb() -> float:
    """Resident set size of this process, from /proc (no psutil)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to measure memory")
def test_memory_stays_flat_under_repeated_requests(client, tiny_data):
    data, bad = image(tiny_data, "green_circle_2.jpg"), (FIXTURES / "truncated.jpg").read_bytes()
    for _ in range(10):  # warm up: allocator pools, thread pools, caches
        post(client, data)
    before = rss_mb()
    for i in range(60):
        r = post(client, bad, name="truncated.jpg") if i % 10 == 9 else post(client, data)
        assert r.status_code in (200, 422)
    growth = rss_mb() - before
    assert growth < 25, f"RSS grew by {growth:.1f} MB over 60 requests"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to measure memory")
def test_sixteen_huge_uploads_at_once_keep_memory_bounded_and_the_server_answering(client):
    import io as io_

    from PIL import Image

    def png(side):
        buf = io_.BytesIO()
        Image.new("RGB", (side, side)).save(buf, "PNG")  # a few hundred KB that decode to 150 MB and more
        return buf.getvalue()

    big, bomb = png(7000), png(8000)  # 49 megapixels, under the upload limit; 64, over it
    r = post(client, bomb, name="bomb.png")
    assert r.status_code == 422 and "too large" in r.json()["detail"]
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            done.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        answers = [pool.submit(post, client, big, name=f"big{i}.png") for i in range(16)]
        assert client.get("/healthz").status_code == 200  # still answering during the burst
        codes = [a.result().status_code for a in answers]
    done.set()
    watcher.join()
    assert codes == [200] * 16
    # two decodes at a time, each about 450 MB at its peak (decoded, converted, turned upright)
    assert peak[0] - before < 1500, f"RSS rose {peak[0] - before:.0f} MB for 16 concurrent 49-MP uploads"
    assert rss_mb() - before < 400, "the memory of the burst stayed held"


def test_slow_clients_are_cut_off_while_healthz_answers_and_a_slow_honest_upload_finishes(model):
    """Slowloris: connections that send nothing, trickle headers or trickle a body are closed (408) at
    their deadline; /healthz answers all the while; an upload at more than min_rate finishes."""
    import io as io_
    import select
    import socket
    import time

    import httpx
    import numpy as np
    from PIL import Image

    from conftest import serve

    buf = io_.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    photo = buf.getvalue()  # about 7 KB: 2.8 s at the honest client's 2,500 bytes a second
    app = create_app(model, max_upload_bytes=LIMIT)
    with serve(app, header_timeout=1.0, body_timeout=1.0, min_rate=1000) as url:
        host, port = url.removeprefix("http://").split(":")
        address = (host, int(port))

        def connect(first: bytes) -> socket.socket:
            s = socket.create_connection(address)
            s.sendall(first)
            return s

        post = (
            b"POST /api/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n--b0undary\r\n"
            b'Content-Disposition: form-data; name="file"; filename="n.png"\r\n\r\n'
        )
        began = time.monotonic()
        slow = {"silent": [connect(b"") for _ in range(100)]}
        slow["headers"] = [connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n") for _ in range(50)]
        slow["body"] = [connect(post + b"x" * 10) for _ in range(50)]
        closed: dict[socket.socket, float] = {}  # when the server closed it
        got: dict[socket.socket, bytes] = {}
        stop = threading.Event()

        def trickle():  # 1 header byte or 10 body bytes a socket every 0.1 s: 10 and 100 bytes a second
            while not stop.wait(0.1):
                for kind, chunk in (("headers", b"X"), ("body", b"x" * 10)):
                    for s in slow[kind]:
                        if s not in closed:
                            try:
                                s.send(chunk)
                            except OSError:
                                pass

        honest: dict = {}

        def upload():  # a real multipart upload at 2,500 bytes a second, well past body_timeout
            boundary = b"b0undary"
            body = (
                b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="n.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + photo + b"\r\n--" + boundary + b"--\r\n"
            )
            head = (
                f"POST /api/caption HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                f"{len(body)}\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
            ).encode()
            with socket.create_connection(address) as s:
                s.sendall(head)
                for i in range(0, len(body), 250):
                    s.sendall(body[i : i + 250])
                    time.sleep(0.1)
                honest["seconds"] = time.monotonic() - began
                honest["answer"] = b"".join(iter(lambda: s.recv(65536), b""))

        threads = [threading.Thread(target=trickle), threading.Thread(target=upload)]
        for t in threads:
            t.start()
        try:
            for _ in range(10):  # 200 slow connections open: a new client is still answered at once
                t0 = time.monotonic()
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                assert time.monotonic() - t0 < 1.0
            everyone = [s for group in slow.values() for s in group]
            while len(closed) < len(everyone) and time.monotonic() - began < 10:
                readable, _, _ = select.select([s for s in everyone if s not in closed], [], [], 0.5)
                for s in readable:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        got[s] = got.get(s, b"") + data
                    else:
                        closed[s] = time.monotonic() - began
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert len(closed) == len(everyone), f"{len(everyone) - len(closed)} slow connections still open"
        # deadlines: 1 s (headers), 1 s + 100 bytes a second / 1,000 (body); 3 s of slack for a busy machine
        assert max(closed.values()) < 5
        assert all(got.get(s, b"").startswith(b"HTTP/1.1 408 ") for s in everyone)
        assert b" 200 OK" in honest["answer"].split(b"\r\n")[0], honest.get("answer", b"")[:200]
        assert honest["seconds"] > 2  # longer than any deadline but for the allowance its bytes earned
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


# --- search: needs captioner.search (PhotoIndex) ---


def build_index(db: Path, images: Path):
    """A PhotoIndex of the tiny data set's photos, each stored with the caption that describes it (the
    tiny model's own captions are too poor to search), through the search module's storing function."""
    search = pytest.importorskip("captioner.search", reason="captioner.search is not there yet")
    index = search.PhotoIndex(db, create=True)
    for path in sorted(images.glob("*.jpg")):
        colour, shape, _ = path.stem.split("_")
        captions = [{"caption": f"a {colour} {shape} on a white background", "score": -1.0}]
        stat = path.stat()
        index._store(
            str(path),
            stat.st_size,
            stat.st_mtime,
            {"caption": captions[0]["caption"], "captions": captions},
            str(images),
        )
    return index


@pytest.fixture(scope="module")
def photo_index(tiny_data, tmp_path_factory):
    return build_index(tmp_path_factory.mktemp("index") / "photos.sqlite", tiny_data / "images")


@pytest.fixture(scope="module")
def search_client(model, photo_index):
    with TestClient(create_app(model, index=photo_index)) as c:
        yield c


def test_search_says_when_no_photo_is_a_good_match(search_client):
    body = search_client.get("/api/search", params={"q": "a green circle", "top": 3}).json()
    assert body["good_match"] is True and body["hits"][0]["match"] is True
    body = search_client.get("/api/search", params={"q": "a plate of spaghetti", "top": 3}).json()
    assert body["good_match"] is False and len(body["hits"]) == 3  # the nearest, marked as such
    assert not any(h["match"] for h in body["hits"])


def test_search_finds_indexed_photos(search_client):
    assert search_client.get("/healthz").json()["search"] is True
    hits = search_client.get("/api/search", params={"q": "a red square", "top": 3}).json()["hits"]
    assert 0 < len(hits) <= 3
    assert "red_square" in hits[0]["path"] and set(hits[0]) >= {
        "path",
        "caption",
        "score",
        "semantic",
        "keyword",
    }
    thumb = search_client.get("/api/photo", params={"path": hits[0]["path"]})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:2] == b"\xff\xd8"
    full = search_client.get("/api/photo", params={"path": hits[0]["path"], "size": "full"})
    assert full.status_code == 200 and full.content == Path(hits[0]["path"]).read_bytes()
    assert search_client.get("/api/search", params={"q": ""}).status_code == 422
    assert hits[0]["name"] == Path(hits[0]["path"]).name  # as its owner knows it: in the indexed folder


def test_docs_need_no_internet(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    scripts = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
    assert scripts and all(s.startswith("/") for s in scripts), scripts  # served here, not from a CDN
    for asset in scripts:
        assert client.get(asset).status_code == 200


def test_serve_captions_uploads_with_the_model_that_made_the_index(tiny_model, tiny_data, tmp_path):
    import argparse

    from captioner.search import PhotoIndex
    from captioner.server import load_app

    db = tmp_path / "photos.sqlite"
    PhotoIndex(db, create=True).update(
        tiny_data / "images", Captioner.from_pretrained(tiny_model), model_name=str(tiny_model)
    )
    args = argparse.Namespace(
        model=None, db=str(db), device="cpu", max_upload_mb=5.0, max_batch=4, max_wait_ms=1.0
    )
    with TestClient(load_app(args)) as c:
        health = c.get("/healthz").json()
    assert health["model"] == tiny_model.name and health["decoder"] == "attention"


def test_photo_serves_only_indexed_paths(search_client, tiny_data):
    hit = search_client.get("/api/search", params={"q": "circle", "top": 1}).json()["hits"][0]
    inside = Path(hit["path"])
    for path in (
        "/etc/passwd",
        f"{inside.parent}/../captions.csv",  # a real file beside the photos, reached by ..
        f"{inside.parent}/../images/{inside.name}",  # the same photo, spelled another way
        str(tiny_data / "captions.csv"),
    ):
        r = search_client.get("/api/photo", params={"path": path, "size": "full"})
        assert r.status_code == 404, path
        assert "not a photo in the index" in r.json()["detail"]
    assert search_client.get("/api/photo", params={"path": str(inside), "size": "huge"}).status_code == 422


def test_photo_serves_only_captioned_unchanged_image_files(model, tiny_data, tmp_path):
    import os
    import shutil

    from captioner.search import PhotoIndex

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("red_square_0.jpg", "blue_circle_1.jpg"):
        shutil.copy(tiny_data / "images" / name, folder / name)
    (folder / "notes.jpg").write_text("a text file named like a photo")  # captioning it fails
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    index = PhotoIndex(tmp_path / "photos.sqlite", create=True)
    index.update(folder, model, progress=False)
    st = secret.stat()  # a row that says "captioned" for a hard link to a file that is not an image
    os.link(secret, folder / "linked.jpg")
    index._store(
        str(folder / "linked.jpg"), st.st_size, st.st_mtime, {"caption": "x", "captions": []}, str(folder)
    )
    with TestClient(create_app(model, index=index)) as c:

        def full(name):
            return c.get("/api/photo", params={"path": str(folder / name), "size": "full"})

        assert full("red_square_0.jpg").content == (folder / "red_square_0.jpg").read_bytes()
        assert full("red_square_0.jpg").headers["content-type"] == "image/jpeg"
        assert full("notes.jpg").status_code == 404  # its captioning failed: never served
        assert full("linked.jpg").status_code == 404 and "not an image" in full("linked.jpg").json()["detail"]
        (folder / "blue_circle_1.jpg").write_bytes(secret.read_bytes())  # replaced after indexing
        r = full("blue_circle_1.jpg")
        assert r.status_code == 404 and "changed since it was indexed" in r.json()["detail"]


def test_similar_photos_need_an_index_with_a_search_embedding(
    model, search_client, tiny_model, tiny_embedding, tiny_data, tmp_path
):
    from captioner.search import PhotoIndex, attach_embedding

    first = str(sorted((tiny_data / "images").glob("*.jpg"))[0])
    assert search_client.get("/healthz").json()["similar"] is False
    r = search_client.get("/api/similar", params={"path": first})
    assert r.status_code == 404 and "no search embedding" in r.json()["detail"]

    from captioner.search.joint import JointEmbedding

    index = PhotoIndex(tmp_path / "photos.sqlite", create=True)
    index.update(
        tiny_data / "images",
        model,
        progress=False,
        joint=JointEmbedding.from_pretrained(tiny_embedding),
        joint_name=str(tiny_embedding),
    )
    assert attach_embedding(index)
    with TestClient(create_app(model, index=index)) as c:
        assert c.get("/healthz").json()["similar"] is True
        body = c.get("/api/similar", params={"path": first, "top": 4}).json()
        assert body["path"] == first and len(body["hits"]) == 4
        assert first not in [h["path"] for h in body["hits"]] and body["hits"][0]["joint"] is not None
        r = c.get("/api/similar", params={"path": "/etc/passwd"})
        assert r.status_code == 404 and "not a photo in the index" in r.json()["detail"]
    index.close()


def test_a_file_sent_as_an_option_is_a_422_naming_the_field_not_the_upload(client, tiny_data):
    files = {
        "file": ("photo.jpg", image(tiny_data), "image/jpeg"),
        "beam_size": ("x.jpg", b"123", "image/jpeg"),
    }
    r = client.post("/api/caption", files=files)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "beam_size"
    assert "UploadFile" not in r.text and "Headers" not in r.text
