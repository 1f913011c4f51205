"""The serve API through an ASGI test client: answers equal `query --json`'s, every bad input gets its status
and a JSON message, text queries need CLIP, concurrent requests are safe, and no response of any test here names
an absolute path of this machine (ApiClient checks each one)."""
from __future__ import annotations

import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
from fastapi.testclient import TestClient

from lookalike.cli import cli
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.serve.app import create_app
from tests.conftest import SHAPES, TINY_CLASSIFIER, TINY_EMBEDDER, draw_shape

UPLOAD_LIMIT = 64 << 10
SMALL_CLIP = "clip:ViT-S-32-alt@random"  # an open_clip model with both towers, 43 M parameters

LOCAL = "http://localhost:8000"  # the Host a browser on this machine sends


# An absolute path of this machine in a response: what serve must never send (unless --show-paths).
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:tmp|home|root|work|var|usr|etc|opt|srv|mnt|private|Users)/")


class ApiClient(TestClient):
    """A TestClient that fails the test whenever a response (body or headers, images aside) names an absolute path
    of this machine: every API test checks that nothing leaks."""

    def request(self, *args, **kwargs):
        response = super().request(*args, **kwargs)
        if not response.headers.get("content-type", "").startswith("image/"):
            text = response.text + "\n" + "\n".join(response.headers.values())
            leak = MACHINE_PATH.search(text)
            assert leak is None, f"{response.request.url} sent a path: {text[max(0, leak.start() - 60):leak.end() + 60]}"
        return response


def api_client(cache: Path, base_url: str = LOCAL, **options) -> ApiClient:
    return ApiClient(create_app(cache, {"device": "cpu"}, **options), base_url=base_url)


def draw_gallery(root: Path) -> Path:
    for index, (label, (colour, shape)) in enumerate(SHAPES.items()):
        for i in range(6):
            draw_shape(root / label / f"{i}.png", colour, shape, seed=100 * index + i)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    config = PipelineConfig(classifier=TINY_CLASSIFIER, embedder=TINY_EMBEDDER, device="cpu", batch_size=4)
    build_cache(draw_gallery(root / "gallery"), root / "cache", config)
    return root / "cache"


@pytest.fixture(scope="module")
def client(cache) -> TestClient:
    return api_client(cache, max_upload_bytes=UPLOAD_LIMIT)


def cli_json(*arguments: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["query", *arguments, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def top(answer: dict) -> list[tuple[int, float]]:
    return [(r["row"], round(r["score"], 4)) for r in answer["results"]]


@pytest.mark.parametrize("buckets", [None, "flat", "fused:3@2"])
def test_upload_answers_as_query_json(client, cache, buckets):
    photo = cache.parent / "gallery" / "blue_squares" / "4.png"
    extra = ["--buckets", buckets] if buckets else []
    [expected] = cli_json(str(photo), "--cache", str(cache), *extra)
    form = {"k": "5"} | ({"buckets": buckets} if buckets else {})
    response = client.post("/api/query", files={"file": ("4.png", photo.read_bytes(), "image/png")}, data=form)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["query"] == "4.png" and answer["buckets"] == expected["buckets"]
    assert answer["predicted"] == expected["predicted"] and answer["candidates"] == expected["candidates"]
    assert top(answer) == top(expected) and len(answer["results"]) == 5
    assert [r["thumbnail"] for r in answer["results"]] == [f"/api/thumbnails/{r['row']}" for r in expected["results"]]


def test_a_camera_size_jpeg_upload_is_decoded_as_query_decodes_it(client, cache, tmp_path):
    """A big JPEG is drafted to the pipeline's decode size by `query`; an upload must be decoded the same way."""
    photo = tmp_path / "big.jpg"
    with Image.open(cache.parent / "gallery" / "blue_squares" / "4.png") as image:
        image.convert("RGB").resize((1600, 1200), Image.BICUBIC).save(photo, quality=50)  # under UPLOAD_LIMIT
    [expected] = cli_json(str(photo), "--cache", str(cache))
    response = client.post("/api/query", files={"file": ("big.jpg", photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    assert top(response.json()) == top(expected)


def test_row_query_answers_as_query_json_on_that_gallery_image(client, cache):
    """The stored embedding answers as the image file does. A fixed policy: the cache's `auto` may re-rank, and on
    random tiny-model vectors (all at cosine ~0.99) its order flips on the last float bits (stored from a batch of
    4, embedded again from a batch of 1)."""
    photo = cache.parent / "gallery" / "green_triangles" / "1.png"
    [expected] = cli_json(str(photo), "--cache", str(cache), "-k", "4", "--buckets", "fused:3@2")
    row = expected["results"][0]["row"]
    assert expected["results"][0]["path"] == str(photo)
    answer = client.post("/api/query", json={"row": row, "k": 3, "buckets": "fused:3@2"}).json()
    assert answer["query"] == "green_triangles/1.png" and answer["buckets"] == expected["buckets"]
    assert [p["class"] for p in answer["predicted"]] == [p["class"] for p in expected["predicted"]]
    assert top(answer) == top(expected)[1:]  # "more like this" leaves the row itself out
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3]


def test_info_health_page_and_thumbnails(client, cache):
    info = client.get("/api/info").json()
    assert info["gallery_images"] == 18 and info["text_queries"] is False and info["policy"] != "auto"
    assert info["pipeline"]["embedder"] == TINY_EMBEDDER and info["fingerprint"]["stages"]
    assert client.get("/healthz").json()["ok"] is True
    page = client.get("/")
    assert page.status_code == 200 and "<title>lookalike</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    first = client.get("/api/thumbnails/3")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(first.content)).size == (96, 96)  # the drawn image, never enlarged
    made = list(cache.glob("gen-*/thumbnails/3.jpg"))
    assert len(made) == 1
    stamp = made[0].stat().st_mtime_ns
    assert client.get("/api/thumbnails/3").content == first.content and made[0].stat().st_mtime_ns == stamp


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client, data: bytes, name: str = "q.png"):
    return client.post("/api/query", files={"file": (name, data, "image/png")})


@pytest.mark.parametrize("send, status, message", [
    (lambda c: upload(c, b"just some text"), 415, "q.png: not an image"),
    (lambda c: upload(c, png_bytes((64, 64))[:60]), 400, "q.png: cannot decode"),
    (lambda c: upload(c, b""), 400, "empty file"),
    (lambda c: upload(c, png_bytes((10_000, 10_000), "1")), 400, "too large (10000x10000 = 100 MP; the limit is 50 MP)"),
    (lambda c: upload(c, b"\0" * (UPLOAD_LIMIT + 1)), 413, "upload too large: the limit is 0.0625 MiB"),
    (lambda c: c.post("/api/query", content=(b"\0" * 4096 for _ in range(20)),  # chunked: no length given
                      headers={"content-type": "multipart/form-data; boundary=x"}), 413, "upload too large"),
    (lambda c: c.post("/api/query", data={"k": "3"}, files={"other": ("a", b"a")}), 400, "field named 'file'"),
    (lambda c: c.post("/api/query", json={"row": 18}), 404, "row 18: the gallery has rows 0 to 17"),
    (lambda c: c.post("/api/query", json={"row": -1}), 404, "row -1"),
    (lambda c: c.post("/api/query", json={"row": "3"}), 400, "give a gallery row number"),
    (lambda c: c.post("/api/query", json={"row": 1, "k": 0}), 400, "k 0: give a whole number from 1 to 100"),
    (lambda c: c.post("/api/query", json={"row": 1, "k": "many"}), 400, "k 'many'"),
    (lambda c: c.post("/api/query", json={"row": 1, "k": 2.7}), 400, "k 2.7: give a whole number"),
    (lambda c: c.post("/api/query", json={"row": 1, "k": True}), 400, "k True: give a whole number"),
    (lambda c: c.post("/api/query", json={"row": 1, "k": "5"}), 400, "k '5': give a whole number"),
    (lambda c: c.post("/api/query", content=b'{"row": 1, "k": Infinity}', headers={"content-type": "application/json"}),
     400, "k inf: give a whole number"),
    (lambda c: c.post("/api/query", content=b'{"row": 1, "k": ' + b"9" * 5000 + b"}",
                      headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (lambda c: c.post("/api/query", content=b"[" * 30_000 + b"]" * 30_000,
                      headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (lambda c: c.post("/api/query", data={"k": "2.5"}, files={"file": ("q.png", png_bytes((32, 32)))}), 400,
     "k '2.5': give a whole number"),
    (lambda c: c.post("/api/query", json={"row": 1, "buckets": "nearest"}), 400, "unknown bucket policy 'nearest'"),
    (lambda c: c.post("/api/query", json={"row": 1, "text": "x"}), 400, 'a JSON query is {"row": N} or {"text"'),
    (lambda c: c.post("/api/query", content=b"{row", headers={"content-type": "application/json"}), 400,
     "not valid JSON"),
    (lambda c: c.post("/api/query", content=b"row=1", headers={"content-type": "text/plain"}), 415, "multipart"),
    (lambda c: c.post("/api/query", json={"text": "a red circle"}), 400, "text queries need a CLIP embedder"),
    (lambda c: c.get("/api/thumbnails/18"), 404, "row 18"),
    (lambda c: c.get("/api/thumbnails/..%2F..%2Fetc%2Fpasswd"), 404, ""),
    (lambda c: c.get("/api/nothing"), 404, "Not Found"),
    (lambda c: c.put("/api/query"), 405, "Method Not Allowed"),
])
def test_bad_input_gets_its_status_and_a_json_message(client, send, status, message):
    response = send(client)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "Traceback" not in response.text


def test_thumbnail_of_a_path_outside_the_gallery_is_refused(cache):
    from lookalike.pipeline.serve.thumbnails import Thumbnails

    escapes = ["../cache/CURRENT", "..\\cache\\CURRENT", "", "/etc/passwd"]  # backslashes and empty ones too
    thumbnails = Thumbnails(cache.parent / "gallery", np.array(["red_circles/0.png", *escapes]),
                            cache.parent / "thumbs-escape")
    assert thumbnails.file(0).is_file()
    for row in range(1, len(escapes) + 1):
        with pytest.raises(PermissionError, match="leads outside the gallery root"):
            thumbnails.file(row)


@pytest.mark.parametrize("row", ["²", "①", "9" * 5000, "-1", "1e3"])
def test_a_thumbnail_row_that_is_not_a_plain_number_is_404(client, row):
    response = client.get(f"/api/thumbnails/{row}")
    assert response.status_code == 404 and "rows are numbers" in response.json()["error"]


def test_concurrent_requests_get_the_answers_they_would_get_alone(client, cache):
    photos = sorted((cache.parent / "gallery").glob("*/*.png"))[::3]
    alone = [client.post("/api/query", files={"file": (p.name, p.read_bytes())}).json() for p in photos]
    rows = [client.post("/api/query", json={"row": r, "buckets": "flat"}).json() for r in range(6)]

    def ask(i: int) -> dict:
        if i % 2:
            return client.post("/api/query", json={"row": i // 2 % 6, "buckets": "flat"}).json()
        photo = photos[i // 2 % len(photos)]
        return client.post("/api/query", files={"file": (photo.name, photo.read_bytes())}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(32)))
    for i, answer in enumerate(answers):
        expected = rows[i // 2 % 6] if i % 2 else alone[i // 2 % len(photos)]
        assert top(answer) == top(expected)


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-clip")
    config = PipelineConfig(classifier="none", embedder=SMALL_CLIP, device="cpu", batch_size=6)
    build_cache(draw_gallery(root / "gallery"), root / "cache", config)
    return root / "cache"


def test_text_query_with_a_clip_cache(clip_cache):
    """Random CLIP weights: the answer is the gallery ranked by cosine to the text tower's vector."""
    from lookalike.cache.store import load_cache

    client = api_client(clip_cache)
    assert client.get("/api/info").json()["text_queries"] is True
    answer = client.post("/api/query", json={"text": "a red circle", "k": 3}).json()
    assert answer["buckets"] == "flat" and answer["candidates"] == 18 and answer["predicted"] == []
    vector = open_clip_text_vector("ViT-S-32-alt", "a red circle")
    data = load_cache(clip_cache)
    cosine = np.asarray(data.columns["embeddings"]) @ vector
    best = np.argsort(-cosine, kind="stable")[:3]
    assert [r["row"] for r in answer["results"]] == best.tolist()
    assert [r["score"] for r in answer["results"]] == pytest.approx(cosine[best].tolist(), abs=1e-5)
    assert client.post("/api/query", json={"text": " "}).status_code == 400
    [from_cli] = cli_json("--text", "a red circle", "--cache", str(clip_cache), "-k", "3", "--device", "cpu")
    assert top(from_cli) == top(answer)  # a second load of the text tower: the same seeded weights


def open_clip_text_vector(model_id: str, text: str) -> np.ndarray:
    """The text's unit vector computed here from open_clip directly: the model randomly initialised under seed 0 (as
    `@random` is), its own tokenizer and encode_text, normalised with numpy."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms(model_id, pretrained=None)
    with torch.no_grad():
        vector = model.eval().encode_text(open_clip.get_tokenizer(model_id)([text]))[0].numpy()
    return vector / np.linalg.norm(vector)


def test_a_text_query_loads_no_image_model_and_both_towers_share_one_model(clip_cache, monkeypatch):
    import lookalike
    from lookalike.pipeline import session

    index = lookalike.open(clip_cache, device="cpu", runtime="torch")
    with monkeypatch.context() as patch:
        patch.setattr(session, "open_query_pipeline", lambda *args: pytest.fail("a text query loaded image models"))
        found = index.query_text("a blue square", k=2)
    assert len(found.results) == 2
    index.query(next((clip_cache.parent / "gallery").glob("*/*.png")))
    embedder = index.session.pipeline.stage("embed").embedder
    assert embedder.visual is index.session.text.model.visual  # one CLIP model, its weights loaded once


def test_text_on_the_command_line_needs_clip(cache):
    result = CliRunner().invoke(cli, ["query", "--text", "a red car", "--cache", str(cache)])
    assert result.exit_code == 1 and "text queries need a CLIP embedder" in result.stderr
    result = CliRunner().invoke(cli, ["query", "--cache", str(cache)])
    assert result.exit_code == 1 and "give query images or --text" in result.stderr


def test_no_absolute_path_leaves_the_server_unless_asked(client, cache):
    """Results carry gallery-relative paths and rows; /api/info, row queries and error messages name no file of
    this machine. --show-paths gives a trusted local user the absolute paths back."""
    photo = cache.parent / "gallery" / "blue_squares" / "4.png"
    responses = [client.get("/api/info"), client.get("/healthz"), client.get("/"),
                 client.post("/api/query", files={"file": ("4.png", photo.read_bytes(), "image/png")}),
                 client.post("/api/query", json={"row": 2}), client.post("/api/query", json={"row": 10**6}),
                 client.post("/api/query", json={"row": 2, "buckets": "nearest"}),
                 client.post("/api/query", files={"file": ("x.png", b"not an image")}),
                 client.get("/api/thumbnails/3"), client.get("/api/thumbnails/100000")]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 404, 400, 415, 200, 404]
    for response in responses:
        if response.headers["content-type"].startswith(("application/json", "text/")):
            assert str(cache.parent) not in response.text and "/tmp/" not in response.text, response.text[:300]
    assert responses[3].json()["results"][0]["path"] == "blue_squares/4.png"
    trusted = TestClient(create_app(cache, {"device": "cpu"}, show_paths=True), base_url=LOCAL)
    assert trusted.post("/api/query", json={"row": 2}).json()["results"][0]["path"].startswith(str(cache.parent))
    assert trusted.get("/api/info").json()["gallery_root"] == str(cache.parent / "gallery")


def test_hide_paths_keeps_relative_paths_and_policies():
    from lookalike.pipeline.serve.app import hide_paths

    assert hide_paths("/home/ann/photos/x.jpg: cannot decode (/tmp/y.png)") == "x.jpg: cannot decode (y.png)"
    assert hide_paths({"p": ["red/1.png", "/srv/g/red/1.png"], "policy": "flat+krecip:5/2"}) == \
        {"p": ["red/1.png", "1.png"], "policy": "flat+krecip:5/2"}


@pytest.mark.parametrize("host, status", [("localhost:8000", 200), ("127.0.0.1", 200), ("[::1]:8000", 200),
                                          ("evil.example", 400), ("localhost.evil.example", 400)])
def test_only_known_host_names_are_answered(client, host, status):
    """Against DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    assert client.get("/api/info", headers={"host": host}).status_code == status


def test_a_cross_site_post_is_refused_and_every_answer_has_security_headers(client, cache):
    photo = (cache.parent / "gallery" / "blue_squares" / "4.png").read_bytes()
    foreign = client.post("/api/query", files={"file": ("4.png", photo)}, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403 and "only this server's own page" in foreign.json()["error"]
    own = client.post("/api/query", files={"file": ("4.png", photo)}, headers={"origin": LOCAL})
    assert own.status_code == 200
    for response in (own, foreign, client.get("/"), client.get("/api/thumbnails/1")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_an_added_host_name_is_answered(cache):
    client = api_client(cache, "http://photos.lan:8000", host="0.0.0.0", extra_hosts=("photos.lan",))
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/info", headers={"host": "0.0.0.0:8000"}).status_code == 400


def test_a_token_is_needed_for_everything_but_the_page(cache):
    from urllib.parse import quote

    client = api_client(cache, token="s3cret pass")
    assert client.get("/").status_code == 200 and client.get("/healthz").status_code == 200
    refused = client.get("/api/info")
    assert refused.status_code == 401 and "access token" in refused.json()["error"]
    assert client.get("/api/thumbnails/1").status_code == 401
    assert client.get("/api/info", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/info", headers={"authorization": "Bearer s3cret pass"}).status_code == 200
    client.cookies.set("lookalike_token", quote("s3cret pass"))
    assert client.post("/api/query", json={"row": 1}).status_code == 200
    assert client.get("/api/thumbnails/1").status_code == 200


def test_listening_beyond_loopback_needs_a_token_or_no_auth(cache, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda server: None)  # everything up to listening
    runner = CliRunner()
    refused = runner.invoke(cli, ["serve", "--cache", str(cache), "--host", "0.0.0.0", "--device", "cpu"])
    assert refused.exit_code == 1 and "give --token TOKEN" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    for extra in (["--token", "t"], ["--no-auth"]):
        started = runner.invoke(cli, ["serve", "--cache", str(cache), "--host", "0.0.0.0", "--device", "cpu", *extra])
        assert started.exit_code == 0, started.output


def test_a_generation_published_under_a_running_server_is_picked_up_without_a_failed_request(tmp_path):
    import threading

    from lookalike.cache.store import load_cache

    config = PipelineConfig(classifier=TINY_CLASSIFIER, embedder=TINY_EMBEDDER, device="cpu", batch_size=4)
    gallery = draw_gallery(tmp_path / "gallery")
    build_cache(gallery, tmp_path / "cache", config)
    client = api_client(tmp_path / "cache")
    assert client.get("/api/info").json()["gallery_images"] == 18
    for i in range(3):
        draw_shape(gallery / "yellow_circles" / f"{i}.png", (230, 200, 20), "ellipse", seed=900 + i)
    statuses, done = [], threading.Event()

    def ask_meanwhile() -> None:
        while not done.is_set():
            statuses.append(client.post("/api/query", json={"row": 0, "buckets": "flat"}).status_code)
            statuses.append(client.get("/api/thumbnails/1").status_code)

    asking = threading.Thread(target=ask_meanwhile)
    asking.start()
    try:
        build_cache(gallery, tmp_path / "cache", config)  # publishes a new generation, removes the old one
    finally:
        done.set()
        asking.join()
    assert statuses and set(statuses) == {200}, statuses
    assert client.get("/api/info").json()["gallery_images"] == 21
    paths = load_cache(tmp_path / "cache").columns["paths"].tolist()
    new_row = paths.index("yellow_circles/0.png")
    answer = client.post("/api/query", json={"row": new_row, "k": 2, "buckets": "flat"}).json()
    assert answer["query"] == "yellow_circles/0.png"
    assert client.get(f"/api/thumbnails/{new_row}").status_code == 200


def test_a_new_dba_matrix_never_stalls_other_queries_and_a_second_is_refused_with_429(cache, monkeypatch):
    """While one request makes the DBA matrix of a new policy, other queries (uploads and rows) are answered at
    once, and a request needing another new matrix is refused with 429 and Retry-After instead of queueing."""
    from lookalike.cache import rerank

    started, release = threading.Event(), threading.Event()
    make_dba = rerank.dba

    def slow_dba(*args, **kwargs):
        started.set()
        release.wait(60)
        return make_dba(*args, **kwargs)

    monkeypatch.setattr(rerank, "dba", slow_dba)
    client = api_client(cache)
    photo = cache.parent / "gallery" / "red_circles" / "2.png"
    with ThreadPoolExecutor(1) as pool:
        heavy = pool.submit(client.post, "/api/query", json={"row": 1, "buckets": "flat+dba:7"})
        assert started.wait(60)
        during = [client.post("/api/query", files={"file": (photo.name, photo.read_bytes())}),
                  client.post("/api/query", json={"row": 2, "buckets": "flat"}),
                  client.post("/api/query", json={"row": 3, "buckets": "flat+dba:8"})]
        answered_while_preparing = not heavy.done()
        release.set()
        assert heavy.result().status_code == 200
    assert answered_while_preparing
    assert [r.status_code for r in during] == [200, 200, 429]
    assert during[2].headers["retry-after"] == "2" and "again in a moment" in during[2].json()["error"]
    assert client.post("/api/query", json={"row": 3, "buckets": "flat+dba:8"}).status_code == 200


def test_a_policy_too_slow_to_prepare_is_refused_with_the_reason(cache, monkeypatch):
    from lookalike.pipeline.serve import app as serve_app

    monkeypatch.setattr(serve_app, "PREPARE_BUDGET_S", 1e-9)
    client = api_client(cache)
    refused = client.post("/api/query", json={"row": 1, "buckets": "flat+dba:5"})
    assert refused.status_code == 400
    assert "would take about" in refused.json()["error"] and "18 images" in refused.json()["error"]
    assert client.post("/api/query", json={"row": 1, "buckets": "flat+qe:5"}).status_code == 200


@pytest.fixture
def listening(cache, monkeypatch):
    """The app on a real uvicorn server (serve's settings) on a free loopback port, with a 0.5 s request deadline."""
    import socket
    import time

    import uvicorn

    from lookalike.pipeline.serve.connections import DeadlineH11Protocol, server_config
    from scripts.load_test import free_port

    monkeypatch.setattr(DeadlineH11Protocol, "request_timeout_s", 0.5)
    port = free_port()
    server = uvicorn.Server(server_config(create_app(cache, {"device": "cpu"}), "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started

    def connect() -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        return connection

    yield connect
    server.should_exit = True
    thread.join(10)


def read_to_end(connection) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_idle_and_half_sent_connections_are_closed_and_the_server_still_answers(listening):
    """Connections that never send a request, or send half a head or half a body, are closed once the request
    deadline passes (each recv would raise socket.timeout after 10 s if one stayed open); whole requests on other
    connections are answered meanwhile."""
    idle = [listening() for _ in range(20)]
    half_head = [listening() for _ in range(20)]
    for connection in half_head:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    half_body = [listening() for _ in range(20)]
    for connection in half_body:
        connection.sendall(b"POST /api/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"row\": ")
    whole = listening()
    whole.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert read_to_end(whole).startswith(b"HTTP/1.1 200")
    for connection in idle + half_head + half_body:
        assert b"200 OK" not in read_to_end(connection)
        connection.close()
    kept_alive = listening()
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    first = b""
    while not first.endswith(b"}"):  # the head, then the JSON body
        first += kept_alive.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")  # a second request left half-sent
    assert read_to_end(kept_alive) == b""
