"""serve under generated input (hypothesis): JSON bodies of any shape, raw bytes, multipart forms and URL paths.
Whatever is sent, the answer is never a 5xx, it is JSON with a one-line error when it is a 4xx, no response names a
path of this machine (ApiClient), and the server still answers afterwards."""
from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from tests.test_policy_grammar import policy_texts
from tests.test_serve import api_client, cache  # noqa: F401  (the module's tiny cache fixture)

FUZZ = settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10)
numbers = st.integers(-3, 30) | st.integers() | st.floats() | st.text(alphabet="0123456789.-+e²①", max_size=12)
policies = policy_texts() | st.text(alphabet="flatopkusedbqcrin0123456789:@~+./", max_size=40) | json_values
query_bodies = st.fixed_dictionaries({}, optional={"row": numbers | json_values, "text": st.text(max_size=30) | json_values,
                                                   "k": numbers | json_values, "buckets": policies})


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


PNG = png()
uploads = st.binary(max_size=300) | st.just(PNG) | st.integers(0, len(PNG)).map(lambda n: PNG[:n])


@pytest.fixture(scope="module")
def client(cache):  # noqa: F811
    return api_client(cache)


def answered_sanely(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400 and response.request.method != "HEAD":
        assert response.headers["content-type"].startswith("application/json"), response.headers
        message = response.json()["error"]
        assert message and "\n" not in message


@FUZZ
@given(body=query_bodies | json_values)
def test_any_json_body_gets_an_answer_or_a_4xx(client, body):
    # json.dumps as a browser-less client may send it: NaN and Infinity included, which strict encoders refuse
    answered_sanely(client.post("/api/query", content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=200), kind=st.sampled_from(["application/json", "multipart/form-data", "text/plain",
                                                          "multipart/form-data; boundary=x", ""]))
def test_any_raw_body_gets_a_4xx(client, raw, kind):
    answered_sanely(client.post("/api/query", content=raw, headers={"content-type": kind}))


@FUZZ
@given(data=uploads, name=st.text(max_size=20), k=st.text(max_size=8), buckets=policies.map(str),
       field=st.sampled_from(["file", "image", "File"]))
def test_any_form_gets_an_answer_or_a_4xx(client, data, name, k, buckets, field):
    answered_sanely(client.post("/api/query", files={field: (name or "x", data)}, data={"k": k, "buckets": buckets}))


@FUZZ
@given(part=st.text(max_size=30) | st.integers().map(str) | st.text(alphabet="0123456789²①٣", min_size=1, max_size=14),
       method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
       where=st.sampled_from(["/api/thumbnails/", "/", "/api/", "/api/query/"]))
def test_any_path_gets_an_answer_or_a_4xx(client, part, method, where):
    answered_sanely(client.request(method, where + quote(part, safe="")))


def test_the_server_still_answers_after_the_fuzzing(client):
    """Last in this module: after everything above, a plain query and the health check still answer."""
    assert client.get("/healthz").status_code == 200
    answer = client.post("/api/query", files={"file": ("red.png", PNG)}).json()
    assert len(answer["results"]) == 5
