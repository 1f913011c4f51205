"""The HTTP app over one cache: the page, `POST /api/query` (answers as `query --json` gives them, plus a
thumbnail URL per result), `GET /api/info`, `GET /healthz` and row thumbnails.

Every error is a JSON body `{"error": "..."}` with a 4xx status saying whose fault it is; an unexpected
one is a 500 with a one-line message (the traceback goes to the server log, not to the client).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from lookalike.cache.manifest import CacheError
from lookalike.cache.milvus import MilvusFailed, MilvusTarget
from lookalike.cache.search import PreparationBusy
from lookalike.cache.generations import current_generation
from lookalike.models.errors import flattened
from lookalike.pipeline.api import Answer, Index
from lookalike.pipeline.images import ImageLoadError, NotAnImage
from lookalike.pipeline.serve.guard import Guard, allowed_hosts, content_security_policy
from lookalike.pipeline.serve.limits import BodyLimit
from lookalike.pipeline.serve.thumbnails import Thumbnails

MAX_UPLOAD_BYTES = 20 << 20  # a phone photo is 2-8 MB
MAX_UPLOAD_PIXELS = 50_000_000  # checked from the header: a small file that decodes to gigabytes is refused
MAX_K = 100
# A policy whose DBA matrix would take longer than this to make on the gallery is refused (400), and one asked for
# while another is being made is refused with 429 and Retry-After: per-policy work never queues the other queries.
PREPARE_BUDGET_S = 5.0
RETRY_AFTER_S = 2
PAGE = Path(__file__).with_name("page.html")
POLICIES = ("flat", "top1", "topk:3", "fused:10+soft:3")  # offered by the page besides the cache's own choice
log = logging.getLogger("lookalike.serve")
# Two overlapping frames: the page's mark, so a browser's automatic /favicon.ico finds something (not a 404).
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect x="1" y="1" width="9" height="9" rx="2" '
           'fill="#3b5bdb"/><rect x="6" y="6" width="9" height="9" rx="2" fill="#f08c00" opacity=".9"/></svg>')


# An absolute path inside a message or a value: a '/' (not part of a relative path or a URL) followed by parts.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/]+/)*(?P<name>[^\s'\"/]+)")


class ApiError(Exception):
    """A request the client can fix; answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": flattened(message)}, status, headers=headers)


def _thumbnail_folder(generation: Path) -> Path:
    """Beside the loaded cache generation (rows are per generation, and go with it); a temporary folder when the
    cache is read-only."""
    folder = generation / "thumbnails"
    try:
        folder.mkdir(exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="lookalike-thumbnails-"))


def _k(value, from_form: bool = False) -> int | None:
    """k parsed strictly: a JSON integer (not 2.7, true, "5" or Infinity), or a form field of digits only."""
    if value is None or value == "":
        return None
    if from_form and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6:
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_K:
        shown = value if type(value) is int else repr(value)[:20]
        raise ApiError(400, f"k {shown}: give a whole number from 1 to {MAX_K}")
    return value


def _buckets(value) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ApiError(400, "buckets: give a policy name such as flat or topk:3")
    return value


def hide_paths(value):
    """`value` (text, or JSON-like data) with every absolute filesystem path cut to its last part: what leaves the
    server names rows and gallery-relative paths, never where files live on this machine."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: match["name"], value)
    if isinstance(value, dict):
        return {key: hide_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [hide_paths(item) for item in value]
    return value


class LiveIndex:
    """The cache's live generation for serve. Before each request it reads CURRENT (a few bytes); when a build has
    published a new generation it opens that one and switches, between requests, without a restart: a request in
    flight finishes on the generation it started with (its rows stay mapped after the folder goes). A generation
    that cannot be opened yet leaves the current one serving."""

    def __init__(self, cache_dir: str | Path, options: dict, milvus: MilvusTarget | None = None):
        self.cache_dir = Path(cache_dir)
        self.options = options
        self.milvus = milvus
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        index = Index(self.cache_dir, self.milvus, **self.options).load().limit_preparation(PREPARE_BUDGET_S)
        thumbnails = Thumbnails(index.gallery_root, index.data.columns["paths"], _thumbnail_folder(index.data.generation))
        self.index, self.thumbnails = index, thumbnails

    def current(self) -> tuple[Index, Thumbnails]:
        """(index, thumbnails) of the live generation."""
        try:
            published = current_generation(self.cache_dir)
        except (CacheError, OSError):
            published = None
        if published is not None and published != self.index.data.generation:
            with self._lock:
                if published != self.index.data.generation:
                    try:
                        self._open()
                    except (CacheError, OSError) as err:  # e.g. removed again by a newer publish: the next request
                        log.warning("keeping %s: %s", self.index.data.generation.name, err)
        return self.index, self.thumbnails


class Queries:
    """The work behind POST /api/query, run in a worker thread: an upload, a gallery row or a text answered as
    `query --json` answers it, paths hidden unless `show_paths`; user errors become ApiErrors (4xx)."""

    def __init__(self, live: LiveIndex, show_paths: bool):
        self.live = live
        self.show_paths = show_paths

    def _answer(self, found: Answer) -> dict:
        result = found.to_json(absolute_paths=self.show_paths)
        if not self.show_paths:
            result = hide_paths(result)
        for r in result["results"]:
            r["thumbnail"] = f"/api/thumbnails/{r['row']}"
        return result

    def run(self, query, *args) -> dict:
        """`query(*args)` with user errors as 400s, unknown rows as 404s, a busy preparation as 429, a failing Milvus
        as 502."""
        try:
            return self._answer(query(*args))
        except IndexError as err:
            raise ApiError(404, str(err)) from None
        except MilvusFailed as err:
            raise ApiError(502, str(err)) from None
        except ValueError as err:  # UserError, CacheError, policy errors: one-line messages for the user
            raise ApiError(400, str(err)) from None
        except PreparationBusy as err:
            raise ApiError(429, str(err), {"Retry-After": str(RETRY_AFTER_S)}) from None

    def upload(self, data: bytes, name: str, buckets: str | None, k: int | None) -> Answer:
        try:
            found = self.live.current()[0].query(data, k, buckets, max_pixels=MAX_UPLOAD_PIXELS)
        except NotAnImage as err:
            raise ApiError(415, f"{name}: {err.reason}") from None
        except ImageLoadError as err:  # undecodable, too large, or refused by the model's preprocessing
            raise ApiError(400, f"{name}: {err.reason}") from None
        found.query = name
        return found

    def row(self, row: int, buckets: str | None, k: int | None) -> Answer:
        """"More like this": the k nearest other images (the row itself, found first, is left out)."""
        index = self.live.current()[0]
        wanted = k or index.session.config.k
        found = index.more_like(row, wanted + 1, buckets)
        others = [result for result in found.results if result.row != row][:wanted]
        found.results = [dataclasses.replace(result, rank=rank) for rank, result in enumerate(others, 1)]
        if not self.show_paths:
            found.query = str(index.data.columns["paths"][row])
        return found

    def text(self, text: str, k: int | None) -> Answer:
        return self.live.current()[0].query_text(text, k)

    async def from_form(self, request: Request) -> dict:
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "a multipart query needs the image in a field named 'file'")
        data = await upload.read()
        return await run_in_threadpool(self.run, self.upload, data, upload.filename or "upload",
                                       _buckets(form.get("buckets")), _k(form.get("k"), from_form=True))

    async def from_json(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as err:  # not UTF-8 or JSON, a 5,000-digit number, 100,000 levels deep
            raise ApiError(400, f"the body is not valid JSON ({type(err).__name__}: {str(err)[:80]})") from None
        if not isinstance(body, dict) or ("row" in body) == ("text" in body):
            raise ApiError(400, 'a JSON query is {"row": N} or {"text": "..."}, with optional k and buckets')
        k = _k(body.get("k"))
        if "text" in body:
            if not isinstance(body["text"], str):
                raise ApiError(400, "text: give a string")
            return await run_in_threadpool(self.run, self.text, body["text"], k)
        if not isinstance(body["row"], int) or isinstance(body["row"], bool):
            raise ApiError(400, f"row {body['row']!r}: give a gallery row number")
        return await run_in_threadpool(self.run, self.row, body["row"], _buckets(body.get("buckets")), k)


def _add_error_handlers(app: FastAPI, show_paths: bool) -> None:
    """Every error as {"error": one line} with its status; an unexpected one as a 500 whose details go to the log."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message if show_paths else hide_paths(err.message), err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(str(e.get("msg")) for e in err.errors()) or "bad request")

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, err: ClientDisconnect) -> Response:
        # The client left mid-request (or was cut off at the request deadline): nobody is there to read an answer.
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return _error(500, f"internal error ({type(err).__name__}); the server log has the details")


def _info(index: Index, max_upload_bytes: int, show_paths: bool) -> dict:
    """GET /api/info: the cache's description plus what the page needs (policies offered, k, limits)."""
    config = index.session.config
    about = index.info
    about["pipeline"]["runtime"] = config.runtime
    about = dict(about, policy=config.buckets, policies=list(POLICIES) if config.uses_classifier else ["flat"],
                 k=config.k, max_k=MAX_K, text_queries=index.session.text_queries, max_upload_bytes=max_upload_bytes)
    if show_paths:
        return about
    about.pop("gallery_root")
    return hide_paths(about)


async def _thumbnail(live: LiveIndex, row: str) -> FileResponse:
    """GET /api/thumbnails/ROW: rows only (ASCII digits), never paths; every failure a 404 that names the row."""
    if not (row.isascii() and row.isdigit() and len(row) <= 12):  # '²' passes isdigit() and fails int()
        raise ApiError(404, f"row {row[:20]!r}: rows are numbers")
    try:
        path = await run_in_threadpool(live.current()[1].file, int(row))
    except IndexError as err:
        raise ApiError(404, str(err)) from None
    except ImageLoadError as err:
        raise ApiError(404, f"row {row}: no thumbnail ({err.reason})") from None
    except OSError as err:  # outside the gallery, unreadable, or the cache was rebuilt
        raise ApiError(404, f"row {row}: no thumbnail ({err.strerror or err})") from None
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _add_routes(app: FastAPI, live: LiveIndex, page: str, max_upload_bytes: int, show_paths: bool) -> None:
    queries = Queries(live, show_paths)

    @app.get("/", response_class=HTMLResponse)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "gallery_images": len(live.current()[0])}

    @app.get("/api/info")
    async def info() -> dict:
        return _info(live.current()[0], max_upload_bytes, show_paths)

    @app.get("/api/thumbnails/{row}")
    async def thumbnail(row: str) -> FileResponse:
        return await _thumbnail(live, row)

    @app.post("/api/query")
    async def query(request: Request) -> dict:
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            return await queries.from_form(request)
        if kind.startswith("application/json"):
            return await queries.from_json(request)
        raise ApiError(415, "send the image as multipart/form-data (field 'file'), or JSON "
                            '{"row": N} or {"text": "..."}')


def create_app(cache_dir: str | Path, overrides: dict | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, show_paths: bool = False, host: str = "127.0.0.1",
               extra_hosts: tuple[str, ...] = (), token: str | None = None,
               milvus: MilvusTarget | None = None) -> FastAPI:
    """An app answering queries on `cache_dir`; the pipeline is loaded here, once. Absolute paths never leave it
    (results carry gallery-relative paths and rows) unless `show_paths`, for a trusted local user. It answers only
    to loopback names, `host` and `extra_hosts`, takes POSTs only from its own page, and with a `token` answers
    only requests that carry it (guard.py). With `milvus` the rows are searched in that collection."""
    live = LiveIndex(cache_dir, overrides or {}, milvus)
    page = PAGE.read_text()
    app = FastAPI(title="lookalike", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.live = live
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    app.add_middleware(Guard, hosts=allowed_hosts(host, extra_hosts), csp=content_security_policy(page), token=token)
    _add_error_handlers(app, show_paths)
    _add_routes(app, live, page, max_upload_bytes, show_paths)
    return app
