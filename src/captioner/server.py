"""`captioner serve`: the captioning web page, its JSON API and photo search.

Requests that arrive together are captioned together. Each upload is decoded and preprocessed in a thread
pool first, so a bad file fails alone with its own error and never reaches a batch. Good images go into a
queue; one model thread takes whatever arrives within `max_wait_ms` (at most `max_batch`), groups it by
decoding options and runs one encoder and decoder pass per group. torch releases the GIL, so the event loop
keeps answering while the model works.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import io
import queue
import stat
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.concurrency import run_in_threadpool

from captioner.errors import CaptionerError, ImageError
from captioner.generation import GenerationOptions
from captioner.images import build_transform, decode_side, load_image, readable_formats

if TYPE_CHECKING:
    import torch

    from captioner.model import Caption, Captioner
    from captioner.search import PhotoIndex

STATIC = Path(__file__).parent / "static"
MAX_BEAM = 10
THUMB_SIDE = 256
UPLOAD_MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo; larger uploads are scans or bombs
DECODES = 2  # uploads decoded at once: the rest wait, so memory is bounded by this, not by the clients
FORM_SLACK = 64 * 1024  # room for the multipart headers and small form fields around the file itself


@dataclass
class _Job:
    image: torch.Tensor
    options: GenerationOptions  # only jobs with equal options share a pass
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """One model thread fed by a queue; what arrives within max_wait_ms is captioned in one pass."""

    def __init__(self, captioner: Captioner, *, max_batch: int = 16, max_wait_ms: float = 10.0) -> None:
        self.captioner = captioner
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self.batches = self.requests = self.largest = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def caption(self, image: torch.Tensor, options: GenerationOptions) -> tuple[Caption, dict]:
        """Queue one preprocessed image; returns its Caption and timings once its batch has run."""
        with self._lock:  # started lazily, so an app can be served, shut down and served again
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="captioner-model", daemon=True)
                self._thread.start()
        loop = asyncio.get_running_loop()
        job = _Job(image, options, loop, loop.create_future())
        self._queue.put(job)
        return await job.future

    def close(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
                self._thread.join(timeout=60)
            self._thread = None

    def stats(self) -> dict:
        mean = self.requests / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "requests": self.requests,
            "mean_batch_size": round(mean, 3),
            "largest_batch": self.largest,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000,
        }

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            jobs = [first]
            deadline = time.perf_counter() + self.max_wait
            while len(jobs) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:  # close(): finish this batch, then stop
                    self._queue.put(None)
                    break
                jobs.append(job)
            groups: dict[GenerationOptions, list[_Job]] = defaultdict(list)
            for job in jobs:
                groups[job.options].append(job)
            for options, group in groups.items():
                self._pass(group, options)

    def _pass(self, jobs: list[_Job], options: GenerationOptions) -> None:
        import torch

        start = time.perf_counter()
        results: list[Any] = [None] * len(jobs)
        error: Exception | None = None
        try:
            batch = torch.stack([job.image for job in jobs])
            results = self.captioner.caption_tensors(batch, options)
            if len(results) != len(jobs):
                raise RuntimeError(f"{len(results)} captions for {len(jobs)} images")
        except Exception as e:  # reported to every request of this pass; the thread carries on
            error = e
        model_ms = (time.perf_counter() - start) * 1000
        self.batches, self.requests = self.batches + 1, self.requests + len(jobs)
        self.largest = max(self.largest, len(jobs))
        for job, result in zip(jobs, results, strict=True):
            timing = {"queue_ms": (start - job.queued) * 1000, "model_ms": model_ms, "batch_size": len(jobs)}
            with contextlib.suppress(RuntimeError):  # the request's event loop is gone: nobody is waiting
                job.loop.call_soon_threadsafe(_settle, job.future, result, error, timing)


def _settle(future: asyncio.Future, result: Any, error: Exception | None, timing: dict) -> None:
    if future.done():  # cancelled: the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result((result, timing))


class UploadLimit:
    """ASGI middleware: 413 for a body over the limit, from Content-Length at once, else while it streams."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.max_body = max_bytes + FORM_SLACK  # the file is checked exactly once it is read

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            response = JSONResponse({"detail": too_large(self.max_bytes)}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # FastAPI passes HTTPExceptions from the body parser through
                raise HTTPException(413, too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> str:
    return f"upload too large (limit is {limit / 2**20:.2f} MiB)"


def create_app(
    captioner: Captioner,
    *,
    index: PhotoIndex | None = None,
    max_upload_bytes: int = 20 * 2**20,
    max_batch: int = 16,
    max_wait_ms: float = 10.0,
    model_name: str | None = None,
) -> FastAPI:
    """The app around a loaded model and, optionally, a `captioner.search.PhotoIndex`."""
    batcher = Batcher(captioner, max_batch=max_batch, max_wait_ms=max_wait_ms)
    pre = captioner.encoder.preprocess
    transform = build_transform(pre)
    decoder = captioner.decoder_config.name
    name = model_name or f"{captioner.encoder.name}+{decoder}"
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPIOffline(  # a FastAPI app whose /docs needs no internet
        title="captioner", summary="Caption photos and search them by their captions.", lifespan=lifespan
    )
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError) -> JSONResponse:
        """422 naming the field and what is wrong; the offending value only when it is plain data (a
        file sent where a number goes would otherwise echo the upload object's internals)."""
        plain = (str, int, float, bool, type(None))
        detail = [
            {
                k: v
                for k, v in e.items()
                if k in ("loc", "msg", "type") or (k == "input" and isinstance(v, plain))
            }
            for e in error.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.batcher = batcher

    decoding = threading.BoundedSemaphore(DECODES)

    def prepare(data: bytes, filename: str) -> torch.Tensor:
        with decoding:  # a few at a time: each big PNG costs hundreds of MB while it is decoded
            image = load_image(data, name=filename, min_side=decode_side(pre), max_pixels=UPLOAD_MAX_PIXELS)
            tensor = transform(image)
            if image.width * image.height > 16_000_000:
                del image
                _give_back_memory()
        return tensor

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz() -> dict:
        """The model, uptime, whether search is on, and the batching counters."""
        return {
            "status": "ok",
            "model": name,
            "encoder": captioner.encoder.name,
            "decoder": decoder,
            "uptime_s": round(time.time() - started, 1),
            "search": index is not None,
            "similar": index is not None and index.embedding is not None,
            "max_upload_bytes": max_upload_bytes,
            "batching": batcher.stats(),
        }

    @app.post("/api/caption")
    async def caption(
        file: Annotated[UploadFile, File(description="the image (JPEG, PNG, GIF, WebP, BMP, TIFF, PPM)")],
        beam_size_form: Annotated[int | None, Form(alias="beam_size", ge=1, le=MAX_BEAM)] = None,
        n_best_form: Annotated[int | None, Form(alias="n_best", ge=1, le=MAX_BEAM)] = None,
        beam_size: Annotated[int | None, Query(ge=1, le=MAX_BEAM)] = None,
        n_best: Annotated[int | None, Query(ge=1, le=MAX_BEAM)] = None,
        grounding_form: Annotated[bool | None, Form(alias="grounding")] = None,
        grounding: Annotated[bool | None, Query()] = None,
        rerank_form: Annotated[bool | None, Form(alias="rerank")] = None,
        rerank: Annotated[bool | None, Query()] = None,
    ) -> dict:
        """Caption one image: the caption, the n best with scores, timings and, for attention models, the
        attention of each word over the grid. beam_size (default 3) and n_best (default min(3, beam_size))
        may come as form fields or query parameters, and so may grounding (default true: follow the visual
        labels; false: the decoder alone) and rerank (default true: re-rank the beam by the model's
        training neighbours' captions, where it carries them; false: the beam's own order)."""
        beams = beam_size_form or beam_size or 3
        best = n_best_form or n_best or min(3, beams)
        if best > beams:
            raise HTTPException(422, f"n_best ({best}) cannot be larger than beam_size ({beams})")
        filename = Path(file.filename or "upload").name
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, too_large(max_upload_bytes))
        grounded = grounding_form if grounding_form is not None else grounding
        reranked = rerank_form if rerank_form is not None else rerank
        options = GenerationOptions(beam_size=beams, n_best=best, grounding=grounded, rerank=reranked)
        t0 = time.perf_counter()
        try:
            image = await run_in_threadpool(prepare, data, filename)
        except ImageError as e:
            unsupported = e.reason.startswith("not a recognised image")
            raise HTTPException(415 if unsupported else 422, str(e)) from None
        preprocess_ms = (time.perf_counter() - t0) * 1000
        try:
            result, timing = await batcher.caption(image, options)
        except Exception as e:
            raise HTTPException(500, f"{filename}: captioning failed ({type(e).__name__}: {e})") from None
        ms = {"preprocess_ms": preprocess_ms, "queue_ms": timing["queue_ms"], "model_ms": timing["model_ms"]}
        ms["total_ms"] = (time.perf_counter() - t0) * 1000
        used = options.over(captioner.generation)  # what decoding ran with: the model's defaults filled in
        return {
            **result.to_json(detail=True),
            "beam_size": beams,
            "n_best": best,
            "grounding": used.value("grounding"),
            "rerank": bool(used.value("rerank") and captioner.neighbours is not None and beams > 1),
            "batch_size": timing["batch_size"],
            "timing": {k: round(v, 2) for k, v in ms.items()},
        }

    def need_index() -> PhotoIndex:
        if index is None:
            raise HTTPException(404, "search is off: this server has no photo index (start it with --db)")
        return index

    @app.get("/api/search")
    async def search(
        q: Annotated[str, Query(min_length=1, max_length=500, description="words to look for")],
        top: Annotated[int, Query(ge=1, le=100)] = 12,
        rerank: Annotated[bool, Query(description="add P(query | photo) re-ranking (slower)")] = False,
    ) -> dict:
        """The indexed photos that best match the query, best first."""
        found = need_index()
        hits = await run_in_threadpool(found.search, q, top, rerank)
        return {
            "query": q,
            "good_match": any(h.match for h in hits),  # False: the hits are only the nearest photos
            "hits": await run_in_threadpool(_hits_json, found, hits),
        }

    @app.get("/api/similar")
    async def similar(
        path: Annotated[
            str, Query(min_length=1, description="an indexed photo's path, as search returns it")
        ],
        top: Annotated[int, Query(ge=1, le=100)] = 12,
    ) -> dict:
        """The indexed photos most like an indexed photo, by the search embedding, best first."""
        found = need_index()
        if found.embedding is None:
            raise HTTPException(
                404, "the index has no search embedding (re-index with one to find similar photos)"
            )
        try:
            hits = await run_in_threadpool(found.similar, path, top)
        except KeyError:
            raise HTTPException(404, f"{path}: not a photo in the index") from None
        return {"path": path, "hits": await run_in_threadpool(_hits_json, found, hits)}

    @functools.lru_cache(maxsize=512)  # ~10 KB each: a bounded few MB
    def thumbnail(path: str, mtime_ns: int) -> bytes:  # the file's mtime in the key: a changed file is redone
        image = load_image(path, min_side=THUMB_SIDE)
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=82)
        return out.getvalue()

    @app.get("/api/photo")
    async def photo(path: str, size: Literal["thumb", "full"] = "thumb") -> Response:
        """A photo of the index, only if this exact path is in it: the index decides, not the filesystem."""
        row = await run_in_threadpool(need_index().lookup, path)
        if row is None or row["error"] is not None:  # only what was captioned: a failed row is no photo
            raise HTTPException(404, f"{path}: not a photo in the index")
        found = Path(row["path"])
        try:
            st = found.stat()
        except OSError:
            raise HTTPException(404, f"{path}: indexed, but the file is no longer there") from None
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != row["size"]
            or abs(st.st_mtime - row["mtime"]) > 1e-3
        ):
            raise HTTPException(
                404, f"{path}: the file has changed since it was indexed (re-index the folder)"
            )
        if size == "full":
            kind = await run_in_threadpool(_image_format, found)
            if kind is None:
                raise HTTPException(404, f"{path}: not an image file")
            return FileResponse(found, media_type=Image.MIME.get(kind, "application/octet-stream"))
        try:
            data = await run_in_threadpool(thumbnail, str(found), st.st_mtime_ns)
        except ImageError as e:
            raise HTTPException(422, str(e)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def _give_back_memory() -> None:
    """Return freed heap to the system (glibc keeps it otherwise: a burst of big decodes stayed held)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _image_format(path: Path) -> str | None:
    """The format of an image file, from its header (Pillow's allow-listed decoders), or None."""
    try:
        with Image.open(path, formats=sorted(readable_formats())) as img:
            return img.format
    except Exception:
        return None


def _hits_json(index, hits: list) -> list[dict]:
    """Search hits as JSON: scores rounded, and each photo's `name`, its path in the indexed folder."""
    names = index.names([h.path for h in hits])
    return [
        {**{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(h).items()}, "name": name}
        for h, name in zip(hits, names, strict=True)
    ]


def serve_command(args: argparse.Namespace) -> int:
    """`captioner serve`: load the model (and the index), then serve until interrupted."""
    import uvicorn

    from captioner.http_timeouts import uvicorn_config

    app = load_app(args)
    print(f"captioner: serving http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port)).run()
    return 0


def load_app(args: argparse.Namespace) -> FastAPI:
    """The app `captioner serve` serves. With --db and no --model, uploads are captioned by the model
    that captioned the indexed photos, so the page shows one model's words."""
    from captioner.model import DEFAULT_MODEL, Captioner

    index, models = None, args.model
    if args.db:
        from captioner.search import PhotoIndex

        index = PhotoIndex(args.db)  # a missing file is an error, not a new empty index
        if models is None and index.model_name():  # uploads captioned as the indexed photos were
            models = [index.model_name()]
    try:
        captioner = Captioner.from_pretrained(models, device=args.device, runtime="torch")
    except CaptionerError as e:
        if args.model is not None:
            raise
        print(f"captioner: note: the index's model does not load ({e}); captioning with {DEFAULT_MODEL}")
        models = None
        captioner = Captioner.from_pretrained(None, device=args.device, runtime="torch")
    if index is not None:
        from captioner.search import attach_embedding, attach_model

        if not attach_model(index, loaded=captioner):
            print(
                f"captioner: note: cannot load the model that made {args.db}; search uses its captions only"
            )
        if index.embedding_name() and not attach_embedding(index):
            print(
                f"captioner: note: cannot load the search embedding that made {args.db}; ranking without it"
            )
    return create_app(
        captioner,
        index=index,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        model_name=" + ".join(Path(str(m)).name for m in models or [DEFAULT_MODEL]),
    )
