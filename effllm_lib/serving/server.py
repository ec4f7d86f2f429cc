"""An HTTP inference server for vision models with dynamic batching, built on LitServe.

Why LitServe: it gives an HTTP front end (FastAPI/uvicorn), inference workers in their own processes and
dynamic batching (``max_batch_size``, ``batch_timeout``) with a small dependency set (fastapi, uvicorn,
pyzmq, python-multipart: a few MB of wheels, so it can be carried to the device machine, which has no
internet). Ray Serve's ``ray`` wheel alone is larger than what one device call may carry, and NVIDIA
Triton needs its own server binary and container.

A request is ``POST /predict`` with ``multipart/form-data`` holding a JPEG in the field ``image``. The
reply is JSON: the task's result, the batch size it ran in, and the stamps the profiler turns into
per-stage spans (``profiler.STAMPS``). Bad input gets a 4xx with a message and never disturbs the
other requests of its batch: 405 not POST, 411 no Content-Length, 413 too many bytes or pixels, 415 not
multipart or not a JPEG, 400 corrupt, truncated or malformed multipart (no or wrong boundary, too many
parts or files), 408 body not received within ``body_timeout``, 422 no ``image`` field; 503 with
Retry-After while ``max_in_flight`` requests or ``max_queued_bytes`` bytes are in flight.

Resource use: every limit that the headers can decide is applied before the body is read
(``ImageRequestGuard``); the body is parsed as it streams in and the image written to a spool file
(tmpfs), so neither the HTTP process nor LitServe's request queue holds the upload (``UploadReader``).
Pre-decoded pixels (``application/x-npy``, the benchmarks' "no preprocessing" input) are refused unless
``allow_pixels``. ``GET /metrics`` serves Prometheus metrics (``metrics.py``).

Run one: ``python -m effllm_lib.serving.server --port 8000 --model mobilenet_v2 --max-batch-size 8``, or
from Python ``with ServerProcess(model=...) as url: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import litserve as ls
import numpy as np
import torch
import torch.nn.functional as F
from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from litserve.callbacks.base import EventTypes
from litserve.server import RegularRequestHandler

from . import preprocess as pp
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .models import build
from .profiler import now

DEFAULT_MAX_BYTES = 32 * 2**20
PIXELS_TYPE = "application/x-npy"  # pre-decoded pixels: the 'without preprocessing' baseline


# ------------------------------------------------------------------------------------------ HTTP guard
class Rejection(HTTPException):
    """An HTTP error answered before the request reaches a worker; ``cause`` labels it in the metrics."""

    def __init__(self, status: int, detail: str, cause: str, headers: dict | None = None):
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.cause = cause


@dataclass(frozen=True)
class Limits:
    """What one request may cost the HTTP process, and how much may wait at once (see ``ServerConfig``)."""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_in_flight: int = 64
    max_queued_bytes: int = 512 * 2**20
    body_timeout: float = 30.0
    max_parts: int = 4
    max_field_bytes: int = 64 * 2**10
    retry_after: int = 1
    allow_pixels: bool = False


class ImageRequestGuard:
    """ASGI middleware in the HTTP process, in front of ``/predict``: everything that can be decided from the
    request line and headers is decided here, before a byte of the body is read. Wrong method (405), not
    multipart (415), no or bad Content-Length (411, 400), too large (413), and admission: at most
    ``max_in_flight`` requests and ``max_queued_bytes`` declared body bytes at once, else 503 with
    Retry-After. It also stamps when the body was fully received (``x-received-at``) and when the reply
    left (``x-responded-at``) as response headers."""

    def __init__(self, app, limits: Limits = Limits(), metrics: ServerMetrics | None = None,
                 paths: tuple[str, ...] = ("/predict",)):
        self.app, self.limits, self.paths = app, limits, paths
        self.metrics = metrics or ServerMetrics()
        self.in_flight = self.queued_bytes = 0  # one event loop: no lock needed

    async def _reject(self, send, status: int, detail: str, cause: str, headers=()):
        self.metrics.rejected.labels(cause).inc()
        self.metrics.answered.labels(str(status)).inc()
        await _reply(send, status, detail, headers)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        lim = self.limits
        if scope["method"] != "POST":
            return await self._reject(send, 405, f"method {scope['method']} not allowed; use POST", "method",
                                      [(b"allow", b"POST")])
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get(b"content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return await self._reject(send, 415, f"expected multipart/form-data with a JPEG in the field 'image', "
                                                 f"got content type {ctype or 'none'!r}", "content_type")
        length = headers.get(b"content-length")
        if length is None:  # also what a chunked upload looks like: its size is unknown until it is read
            return await self._reject(send, 411, "a Content-Length header is required", "length_required")
        if not length.isdigit() or len(length) > 15:
            return await self._reject(send, 400, f"invalid Content-Length {length[:40]!r}", "bad_length")
        nbytes = int(length)
        if nbytes > lim.max_bytes:
            return await self._reject(send, 413, f"request body of {nbytes} bytes exceeds the limit of "
                                                 f"{lim.max_bytes} bytes", "too_large")
        retry = [(b"retry-after", str(lim.retry_after).encode())]
        if self.in_flight >= lim.max_in_flight:
            return await self._reject(send, 503, f"server busy: {self.in_flight} requests in flight (limit "
                                                 f"{lim.max_in_flight}); retry later", "in_flight_full", retry)
        if self.queued_bytes + nbytes > lim.max_queued_bytes:
            return await self._reject(send, 503, f"server busy: {self.queued_bytes} bytes queued, {nbytes} more "
                                                 f"would exceed the limit of {lim.max_queued_bytes}; retry later",
                                      "queued_bytes_full", retry)
        self.in_flight += 1
        self.queued_bytes += nbytes
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.queued_bytes.set(self.queued_bytes)
        stamp = {}

        async def stamped_receive():
            msg = await receive()
            if msg["type"] == "http.request" and not msg.get("more_body", False):
                stamp["received"] = now()
            return msg

        async def stamped_send(msg):
            if msg["type"] == "http.response.start":
                self.metrics.answered.labels(str(msg["status"])).inc()
                if "received" in stamp:
                    msg = dict(msg)
                    msg["headers"] = list(msg.get("headers", [])) + [
                        (b"x-received-at", repr(stamp["received"]).encode()),
                        (b"x-responded-at", repr(now()).encode())]
            await send(msg)

        try:
            await self.app(scope, stamped_receive, stamped_send)
        finally:
            self.in_flight -= 1
            self.queued_bytes -= nbytes
            self.metrics.in_flight.set(self.in_flight)
            self.metrics.queued_bytes.set(self.queued_bytes)


async def _reply(send, status: int, detail: str, headers=()):
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------- the upload, streamed
class UploadReader:
    """Streams a multipart/form-data body through python-multipart's parser straight into a spool file
    (``spool_dir``, on tmpfs where there is one): the HTTP process never holds the upload, and the request
    queue to the workers carries only the file's path (LitServe's queue lives in a manager process, so a
    payload of bytes would be copied into it and out again). At most ``max_parts`` parts, one file named
    ``image`` (the data of other fields is counted, at most ``max_field_bytes`` each, and dropped)."""

    def __init__(self, boundary: bytes, spool_dir: str, limits: Limits):
        from python_multipart import MultipartParser

        self.spool_dir, self.limits = spool_dir, limits
        self.parts, self.files, self.path, self.file, self.content_type, self.size = 0, 0, None, None, "", 0
        self.ended, self._in_image, self._in_file, self._field_bytes, self.received = False, False, False, 0, None
        self.extra_paths: list[str] = []  # files derived from the upload (a decode pool's tensor)
        self._hfield, self._hvalue, self._headers = b"", b"", {}
        cb = {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
              "on_header_value": self._header_value, "on_header_end": self._header_end,
              "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
              "on_part_end": self._part_end, "on_end": self._end}
        self.parser = MultipartParser(boundary, cb, max_size=limits.max_bytes)

    def _part_begin(self):
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise Rejection(400, f"too many parts in the form (limit {self.limits.max_parts})", "too_many_parts")
        self._headers, self._field_bytes = {}, 0

    def _header_field(self, data, start, end):
        self._hfield += data[start:end]

    def _header_value(self, data, start, end):
        self._hvalue += data[start:end]

    def _header_end(self):
        self._headers[self._hfield.strip().lower()] = self._hvalue.strip()
        self._hfield = self._hvalue = b""

    def _headers_finished(self):
        from python_multipart.multipart import parse_options_header

        disp, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disp != b"form-data" or b"name" not in opts:
            raise Rejection(400, "a form part without 'Content-Disposition: form-data; name=...'", "bad_multipart")
        self._in_image = opts[b"name"] == b"image"
        self._in_file = b"filename" in opts
        if self._in_file or self._in_image:
            self.files += 1
            if self.files > 1:
                raise Rejection(400, "more than one file in the form: it takes one, in the field 'image'",
                                "too_many_files")
        if self._in_image:
            ctype = parse_options_header(self._headers.get(b"content-type", b""))[0].decode("latin-1").lower()
            allowed = IMAGE_TYPES + ((PIXELS_TYPE,) if self.limits.allow_pixels else ())
            if ctype not in allowed:
                raise Rejection(415, f"expected an image/jpeg file, got {ctype or 'no content type'}",
                                "content_type")
            self.content_type = ctype
            fd, self.path = tempfile.mkstemp(prefix="upload-", dir=self.spool_dir)
            self.file = os.fdopen(fd, "wb", buffering=0)

    def _part_data(self, data, start, end):
        if self._in_image:
            self.size += self.file.write(memoryview(data)[start:end])
        elif not self._in_file:  # a text field; a file under another name is dropped (max_bytes bounds it)
            self._field_bytes += end - start
            if self._field_bytes > self.limits.max_field_bytes:
                raise Rejection(413, f"form field larger than {self.limits.max_field_bytes} bytes", "too_large")

    def _part_end(self):
        if self._in_image and self.file is not None:
            self.file.close()
            self.file = None
        self._in_image = False

    def _end(self):
        self.ended = True

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def finish(self) -> dict:
        self.parser.finalize()
        if not self.ended:
            raise Rejection(400, "malformed multipart body: it ended before the closing boundary (wrong or "
                                 "missing boundary?)", "bad_multipart")
        if self.path is None:
            raise Rejection(422, "the form needs a file field named 'image'", "no_image")
        return {"path": self.path, "content_type": self.content_type, "bytes": self.size}

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


PREPROCESSED_TYPE = "application/x-effllm-preprocessed"  # internal: a decode pool's output, never a client's


def _pool_init():
    torch.set_num_threads(1)  # a pool process preprocesses one image at a time


def preprocess_upload(path: str, model: str, pre: pp.PreprocessConfig) -> dict:
    """In a decode-pool process: the uploaded JPEG at ``path`` -> check, decode, resize, normalize (on the
    host if ``pre`` says so) -> the model's input tensor, written next to it (``path + '.tensor'``). Returns
    its description and the stamps, or the error this request gets (any exception is the image's fault)."""
    from .models import TASKS

    st = {"dequeued": now()}
    try:
        _, _, input_size, mean, std = TASKS[model]
        with open(path, "rb") as fh:
            data = fh.read()
        size = pp.check_jpeg(data, pre.max_pixels)
        img = pp.decode(data, pre.decoder, target=input_size, reduced=pre.reduced, strict=pre.strict)
        st["decoded"] = now()
        img = pp.resize(img, input_size)
        st["resized"] = now()
        x = pp.to_uint8_chw(img)
        if tuple(x.shape) != (3, *input_size):
            raise pp.BadImage(400, f"decoded to shape {tuple(x.shape)}, expected (3, {input_size})")
        if pre.normalize_on == "host":
            x = pp.normalize(x, mean, std)
        arr = x.contiguous().numpy()
        arr.tofile(path + ".tensor")
        st["normalized"] = now()
        return {"ok": True, "path": path + ".tensor", "dtype": arr.dtype.str, "shape": list(arr.shape),
                "image_size": list(size), "stamps": st}
    except pp.BadImage as exc:
        return {"ok": False, "status": exc.status, "detail": str(exc), "cause": "bad_image"}
    except Exception as exc:  # noqa: BLE001 - only this request's bytes were being decoded
        return {"ok": False, "status": 400, "detail": f"could not decode the image: {type(exc).__name__}: {exc}"[:500],
                "cause": "decode_error"}


class UploadHandler(RegularRequestHandler):
    """LitServe's request handler with the body read by ``UploadReader`` under a deadline (``body_timeout``:
    408 for a client that sends too slowly), the spool files removed once the request is answered, and the
    reply's stamps fed to the metrics.

    With a decode pool (``decode=(processes, model, PreprocessConfig)``) the handler has the upload
    preprocessed by a pool of processes before it enters the inference queue, so decoding the next
    requests overlaps with the inference worker running the current batch (without a pool the worker
    decodes each request of a batch itself, serially, before it can infer). A bad image is then answered
    straight from the pool. The stamps stay in their order: ``dequeued`` is when a pool process took the
    request, and the wait for the inference worker falls in ``batch_wait``."""

    def __init__(self, lit_api, server, limits: Limits, spool_dir: str, metrics: ServerMetrics,
                 decode: tuple[int, str, pp.PreprocessConfig] | None = None):
        super().__init__(lit_api, server)
        self.limits, self.spool_dir, self.metrics, self.decode = limits, spool_dir, metrics, decode
        self._pool = None

    def pool(self):
        """The decode pool, started on first use: in the HTTP server process, after LitServe has forked it."""
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            self._pool = ProcessPoolExecutor(self.decode[0], mp_context=get_context("spawn"), initializer=_pool_init)
        return self._pool

    async def _prepare_request(self, request, request_type) -> dict:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import parse_options_header
        from starlette.requests import ClientDisconnect

        _, opts = parse_options_header(request.headers.get("content-type", ""))
        boundary = opts.get(b"boundary", b"")
        if not boundary:
            raise Rejection(400, "multipart/form-data needs a boundary parameter", "bad_multipart")
        try:
            reader = UploadReader(boundary, self.spool_dir, self.limits)
        except FormParserError as exc:
            raise Rejection(400, f"malformed multipart header: {exc}", "bad_multipart") from None
        request.state.upload = reader
        async def read_body():
            async for chunk in request.stream():
                reader.write(chunk)

        try:
            await asyncio.wait_for(read_body(), self.limits.body_timeout)
            payload = reader.finish()
        except asyncio.TimeoutError:
            raise Rejection(408, f"request body not received within {self.limits.body_timeout:g} s",
                            "body_timeout") from None
        except ClientDisconnect:
            raise Rejection(400, "client disconnected before sending the whole body", "disconnect") from None
        except FormParserError as exc:
            raise Rejection(400, f"malformed multipart body: {exc}", "bad_multipart") from None
        finally:
            reader.close()
        reader.received = now()
        if self.decode and payload["content_type"] != PIXELS_TYPE:
            _, model, pre = self.decode
            done = await asyncio.get_running_loop().run_in_executor(self.pool(), preprocess_upload, payload["path"],
                                                                    model, pre)
            if not done["ok"]:
                raise Rejection(done["status"], done["detail"], done["cause"])
            reader.extra_paths.append(done["path"])
            with contextlib.suppress(OSError):  # the JPEG is no longer needed: only the tensor waits
                os.unlink(payload["path"])
            payload = {"path": done["path"], "content_type": PREPROCESSED_TYPE, "pre": done}
        return payload

    async def handle_request(self, request, request_type):
        try:
            resp = await super().handle_request(request, request_type)
        except HTTPException as exc:
            cause = getattr(exc, "cause", None) or ("queue_timeout" if exc.status_code == 504 else "internal")
            self.metrics.rejected.labels(cause).inc()
            raise
        finally:
            reader = getattr(request.state, "upload", None)
            for path in ([reader.path] + reader.extra_paths) if reader is not None and reader.path else []:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if isinstance(resp, dict):
            self.metrics.observe_reply({**resp.get("stamps", {}), "received": request.state.upload.received},
                                       resp.get("batch_size"), now())
        elif isinstance(resp, Response) and resp.status_code >= 400:
            self.metrics.rejected.labels(resp.headers.get(CAUSE_HEADER, "worker")).inc()
        return resp


class VisionServer(ls.LitServer):
    """``LitServer`` with ``UploadHandler`` on the API path and ``GET /metrics``."""

    def __init__(self, api, *, limits: Limits, spool_dir: str, decode=None, **kwargs):
        self.limits, self.spool_dir, self.metrics, self.decode = limits, spool_dir, ServerMetrics(), decode
        kwargs.setdefault("middlewares", [])
        kwargs["middlewares"] = [*kwargs["middlewares"],
                                 (ImageRequestGuard, {"limits": limits, "metrics": self.metrics,
                                                      "paths": (api.api_path,)})]
        super().__init__(api, **kwargs)

    def _register_api_endpoints(self, lit_api, request_type, response_type):
        self._callback_runner.trigger_event(EventTypes.ON_SERVER_START.value, litserver=self)
        handler = UploadHandler(lit_api, self, self.limits, self.spool_dir, self.metrics, self.decode)

        async def endpoint_handler(request: Request) -> Response:
            return await handler.handle_request(request, Request)

        self.app.add_api_route(lit_api.api_path, endpoint_handler, methods=["POST"],
                               dependencies=[Depends(self.setup_auth(lit_api))])

        async def metrics_endpoint() -> Response:
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

        self.app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])


# ---------------------------------------------------------------------------------------- the LitAPI
CAUSE_HEADER = "x-effllm-cause"
IMAGE_TYPES = ("image/jpeg", "image/jpg", "application/octet-stream")


@dataclass
class Item:
    """One request inside the worker."""
    x: torch.Tensor | None
    image_size: tuple[int, int]
    stamps: dict = field(default_factory=dict)
    error: tuple[int, str] | None = None
    result: dict | None = None
    batch_size: int = 0
    cause: str = ""
    jpeg: bytes | None = None  # batched GPU decode: the checked JPEG, decoded with its batch in ``predict``


def _failed(st: dict, status: int, detail: str, cause: str) -> Item:
    return Item(None, (0, 0), st, (status, detail), cause=cause)


class VisionAPI(ls.LitAPI):
    """Decode -> resize -> normalize per request; stack, copy, infer per batch; postprocess per request.

    One request never fails another: whatever decoding a request's bytes raises becomes that request's 4xx
    (nothing but its own bytes runs there), and a batch whose inference fails is run again one request at a
    time, so only the request that fails alone gets the error.

    Batched GPU decode (``pre.batch_decode``, decoder ``nvjpeg``): each request only has its JPEG checked on the
    host (header, pixel limit, and the strict scan check); ``predict`` then decodes the whole batch in one
    nvJPEG call, resizes and normalizes on the GPU and infers, the pixels never on the host. A batch that
    nvJPEG fails is decoded again one image at a time (``preprocess.decode_batch_isolated``): only the bad
    image's request gets its 400. ``batch_decoder`` (set before ``setup``) replaces the nvJPEG call, for tests."""

    def __init__(self, model: str = "mobilenet_v2", pre: pp.PreprocessConfig | None = None, *,
                 max_batch_size: int = 8, batch_timeout: float = 0.005, threads: int = 1,
                 pretrained: bool | None = None, allow_pixels: bool = False):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_name, self.pre = model, pre or pp.PreprocessConfig()
        self.threads, self.pretrained, self.allow_pixels = threads, pretrained, allow_pixels
        self.batch_decoder = None  # callable(list of uint8 tensors, device) -> list of CHW tensors; default nvJPEG

    def setup(self, device):
        # ``threads`` intra-op threads on any device: a CUDA worker still normalizes and stacks on the host, and
        # torch's default (one thread per core) in every worker makes them spin against each other
        torch.set_num_threads(self.threads)
        self.dev = torch.device(device)
        if self.pre.decoder == "nvjpeg" and self.batch_decoder is None:
            # fails here, naming torchvision or CUDA, rather than as a 400 for every request
            self.batch_decoder = pp.nvjpeg_batch_decoder(self.dev)
        self.net, self.spec = build(self.model_name, pretrained=self.pretrained)
        self.net.to(self.dev)
        if self.spec.task == "detection":
            self.anchors = self.net.anchors(self.spec.input_size).to(self.dev)
        with torch.inference_mode():  # warm-up so the first request is not timed with lazy init
            self.net(torch.zeros(1, 3, *self.spec.input_size, device=self.dev))
        self._sync()

    def _sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    # ---- per request, in the worker
    def decode_request(self, request):
        st = {"dequeued": now()}
        try:
            return self._decode(request, st)
        except pp.BadImage as exc:
            return _failed(st, exc.status, str(exc), "bad_image")
        except Exception as exc:  # noqa: BLE001 - only this request's bytes were being decoded
            return _failed(st, 400, f"could not decode the image: {type(exc).__name__}: {exc}"[:500],
                           "decode_error")

    def _decode(self, request, st: dict) -> Item:
        if not isinstance(request, dict) or "path" not in request:
            return _failed(st, 422, "the form needs a file field named 'image'", "no_image")
        ctype = request.get("content_type", "")
        if ctype == PREPROCESSED_TYPE:  # set by the HTTP process (a client's part type cannot be this)
            return self._preprocessed(request["pre"])
        allowed = IMAGE_TYPES + ((PIXELS_TYPE,) if self.allow_pixels else ())
        if ctype not in allowed:
            return _failed(st, 415, f"expected an image/jpeg file, got {ctype or 'no content type'}", "content_type")
        try:
            with open(request["path"], "rb") as fh:
                data = fh.read()
        except FileNotFoundError:  # the HTTP process gave up on the request and removed its upload
            return _failed(st, 503, "the upload was withdrawn before a worker reached it", "withdrawn")
        if ctype == PIXELS_TYPE:
            return self._decode_pixels(data, st)
        size = pp.check_jpeg(data, self.pre.max_pixels)
        if self.pre.batch_decode:  # decoded with its batch on the GPU (``_decode_batch``)
            if self.pre.strict:
                pp.check_scan(data)
            return Item(None, size, st, jpeg=data)
        img = pp.decode(data, self.pre.decoder, target=self.spec.input_size, reduced=self.pre.reduced,
                        device=self.dev, strict=self.pre.strict)
        self._sync()
        st["decoded"] = now()
        img = pp.resize(img, self.spec.input_size)
        self._sync()
        st["resized"] = now()
        x = pp.to_uint8_chw(img)
        if tuple(x.shape) != (3, *self.spec.input_size):
            raise pp.BadImage(400, f"decoded to shape {tuple(x.shape)}, expected (3, {self.spec.input_size})")
        if self.pre.normalize_on == "host":
            x = pp.normalize(x, self.spec.mean, self.spec.std)
        self._sync()
        st["normalized"] = now()
        return Item(x, size, st)

    def _preprocessed(self, done: dict) -> Item:
        """A request a decode-pool process has already turned into the model's input tensor."""
        x = torch.from_numpy(np.fromfile(done["path"], dtype=np.dtype(done["dtype"])).reshape(done["shape"]))
        if tuple(x.shape) != (3, *self.spec.input_size):
            raise pp.BadImage(400, f"preprocessed tensor of shape {tuple(x.shape)}, expected (3, {self.spec.input_size})")
        return Item(x, tuple(done["image_size"]), dict(done["stamps"]))

    def _decode_pixels(self, data: bytes, st: dict) -> Item:
        """The "no preprocessing" mode (benchmarks only, ``allow_pixels``): the client sends pixels already
        decoded and resized to the model's input (an .npy uint8 H x W x 3 array), so only normalization
        and the copy remain. The .npy header is checked before any array is allocated."""
        h, w = self.spec.input_size
        buf = io.BytesIO(data)
        fmt = np.lib.format
        try:
            version = fmt.read_magic(buf)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(buf)
        except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
            return _failed(st, 400, f"corrupt pixel array header: {exc}"[:500], "bad_pixels")
        if dtype != np.uint8 or tuple(shape) != (h, w, 3) or fortran:
            return _failed(st, 400, f"pixel array must be C-ordered uint8 of shape ({h}, {w}, 3), got "
                                    f"{dtype} {tuple(shape)}"[:500], "bad_pixels")
        payload = memoryview(data)[buf.tell():]
        if len(payload) != h * w * 3:
            return _failed(st, 400, f"pixel array holds {len(payload)} bytes, its header says {h * w * 3}",
                           "bad_pixels")
        arr = np.frombuffer(payload, np.uint8).reshape(h, w, 3).copy()
        st["decoded"] = st["resized"] = now()
        x = pp.to_uint8_chw(arr)
        if self.pre.normalize_on == "host":
            x = pp.normalize(x, self.spec.mean, self.spec.std)
        st["normalized"] = now()
        return Item(x, (w, h), st)

    def batch(self, items):
        return list(items)

    def predict(self, items):
        single = isinstance(items, Item)
        items = [items] if single else items
        pending = [it for it in items if it.error is None and it.jpeg is not None]
        if pending:
            self._decode_batch(pending)
        ok = [it for it in items if it.error is None]
        if ok:
            try:
                self._infer(ok)
            except Exception:  # noqa: BLE001 - find the request that fails alone; the others are answered
                for it in ok:
                    try:
                        self._infer([it])
                    except Exception as exc:  # noqa: BLE001
                        it.error, it.cause = (500, f"inference failed: {type(exc).__name__}: {exc}"[:500]), \
                            "inference_error"
        return items[0] if single else items

    def _decode_batch(self, items: list[Item]) -> None:
        """Batched GPU decode: one nvJPEG call for the batch's JPEGs (one at a time if it fails, so that a bad
        image fails its own request alone), then resize (and per-request normalize) on the GPU."""
        decoded = pp.decode_batch_isolated([it.jpeg for it in items], self.batch_decoder, self.dev)
        self._sync()
        t = now()
        for it, img in zip(items, decoded):
            it.jpeg = None
            if isinstance(img, pp.BadImage):
                it.error, it.cause = (img.status, str(img)), "bad_image"
            else:
                it.x, it.stamps["decoded"] = img, t
        for it in items:
            if it.error is None:
                try:
                    it.x = pp.resize(it.x, self.spec.input_size)
                except Exception as exc:  # noqa: BLE001 - only this request's pixels were being resized
                    it.error, it.cause = (400, f"could not resize the image: {type(exc).__name__}: {exc}"[:500]), \
                        "decode_error"
        good = [it for it in items if it.error is None]
        self._sync()
        t = now()
        for it in good:
            it.stamps["resized"] = t
            if self.pre.normalize_on == "host":  # per request, as on the host path (but where the pixels are)
                it.x = pp.normalize(it.x, self.spec.mean, self.spec.std)
        self._sync()
        t = now()
        for it in good:
            it.stamps["normalized"] = t

    def _infer(self, ok: list[Item]) -> None:
        t = now()
        for it in ok:
            it.stamps["batched"] = t
        x = pp.to_device([it.x for it in ok], self.dev, pin_memory=self.pre.pin_memory)
        if self.pre.normalize_on == "device":
            x = pp.normalize(x, self.spec.mean, self.spec.std)
        self._sync()
        t = now()
        for it in ok:
            it.stamps["copied"], it.batch_size = t, len(ok)
        with torch.inference_mode():
            y = self.net(x)
        self._sync()
        t = now()
        for it in ok:
            it.stamps["inferred"] = t
        for i, it in enumerate(ok):
            it.result = self.postprocess(y, i, it.image_size)
            it.stamps["postprocessed"] = now()

    def unbatch(self, items):
        return items

    def encode_response(self, item):
        if item.error is not None:
            status, detail = item.error
            return JSONResponse(status_code=status, content={"detail": detail},
                                headers={CAUSE_HEADER: item.cause or "bad_request"})
        return {"task": self.spec.task, "model": self.model_name, "result": item.result,
                "batch_size": item.batch_size, "stamps": item.stamps, "pretrained": self.spec.pretrained}

    # ---- per task
    def postprocess(self, y, i: int, image_size: tuple[int, int]) -> dict:
        """Turn the model's output for request ``i`` into a small JSON result at the original size."""
        task, (w, h) = self.spec.task, image_size
        if task == "classification":
            p = torch.softmax(y[i].float(), 0)
            top = torch.topk(p, 5)
            return {"top5": top.indices.tolist(), "prob": [round(v, 5) for v in top.values.tolist()]}
        if task == "segmentation":
            mask = y[i].argmax(0).to(torch.uint8)
            rows = (torch.arange(h, device=mask.device) * mask.shape[0] // h)
            cols = (torch.arange(w, device=mask.device) * mask.shape[1] // w)
            full = mask[rows][:, cols]  # nearest-neighbour upsampling to the photo's size
            counts = torch.bincount(full.flatten().long(), minlength=y.shape[1])
            return {"pixels_per_class": counts.tolist()}
        if task == "detection":
            deltas, logits = y[0][i].float(), y[1][i].float()
            return {"detections": detect(deltas, logits, self.anchors, (w, h))}
        if task == "depth":
            d = F.interpolate(y[i:i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            q = torch.quantile(d.flatten()[:: max(1, d.numel() // 100_000)], torch.tensor([0.05, 0.5, 0.95],
                                                                                         device=d.device))
            return {"depth_q05_q50_q95": [round(v, 5) for v in q.tolist()]}
        raise ValueError(f"unknown task {task!r}")


# ------------------------------------------------------------------------------------------- detection
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of boxes given as (x1, y1, x2, y2)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float = 0.5) -> torch.Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes by decreasing score."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    ious = box_iou(boxes, boxes)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= ious[i, i + 1:] <= iou
    return order[keep]


def detect(deltas, logits, anchors, image_size, score_threshold=0.5, max_candidates=200, max_out=100):
    """SSD box decoding (variances 0.1/0.2), per-box best class, score threshold, NMS, original pixels."""
    w, h = image_size
    cxcy = anchors[:, :2] + 0.1 * deltas[:, :2] * anchors[:, 2:]
    wh = anchors[:, 2:] * torch.exp((0.2 * deltas[:, 2:]).clamp(max=4))
    boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1) * torch.tensor([w, h, w, h], device=deltas.device)
    scores, labels = torch.sigmoid(logits[:, 1:]).max(1)  # class 0 is background
    cand = torch.nonzero(scores > score_threshold).flatten()
    cand = cand[scores[cand].argsort(descending=True)[:max_candidates]]
    kept = cand[nms(boxes[cand], scores[cand])][:max_out]
    return [{"box": [round(v, 1) for v in boxes[k].tolist()], "label": int(labels[k]) + 1,
             "score": round(float(scores[k]), 4)} for k in kept]


# -------------------------------------------------------------------------------------- run the server
@dataclass
class ServerConfig:
    model: str = "mobilenet_v2"
    decoder: str = "pil"
    reduced: bool = False
    normalize_on: str = "host"
    max_batch_size: int = 8
    batch_timeout: float = 0.005
    workers: int = 1
    api_servers: int = 1
    threads: int = 1
    accelerator: str = "cpu"
    # page-locked staging of each batch before the host-to-device copy (CUDA only: a CPU server ignores it)
    pin_memory: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = pp.DEFAULT_MAX_PIXELS
    pretrained: bool | None = None
    request_timeout: float = 120.0  # seconds a request may wait in the queue before a 504
    # admission and resource limits (per API server process)
    max_in_flight: int = 64  # requests admitted and not yet answered; more get 503 + Retry-After
    max_queued_bytes: int = 512 * 2**20  # their declared body bytes (the spool files' total)
    body_timeout: float = 30.0  # seconds to receive a whole body (a slow client gets 408)
    max_parts: int = 4  # parts of the multipart form
    retry_after: int = 1  # seconds, the Retry-After of a 503
    strict_jpeg: bool = True  # libjpeg's warnings (a scan cut short) are errors
    allow_pixels: bool = False  # accept pre-decoded pixels (benchmarks' "no preprocessing" mode)
    spool_dir: str | None = None  # where uploads are spooled (default: a fresh folder in /dev/shm or $TMPDIR)
    # processes that decode/resize/normalize in the HTTP server, overlapped with inference (0: the inference
    # worker preprocesses each request itself, serially with inference)
    decode_pool: int = 0
    # with decoder "nvjpeg": one nvJPEG call decodes the whole batch on the GPU (see VisionAPI), not one per request
    batch_decode: bool = False

    def __post_init__(self):
        if self.max_batch_size < 1 or self.workers < 1 or self.api_servers < 1 or self.threads < 1:
            raise ValueError("max_batch_size, workers, api_servers and threads must be at least 1")
        if self.batch_timeout < 0:
            raise ValueError("batch_timeout must be >= 0")
        for name in ("max_bytes", "max_in_flight", "max_queued_bytes", "max_parts", "retry_after"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_queued_bytes < self.max_bytes:
            raise ValueError("max_queued_bytes must be at least max_bytes (else a largest request never fits)")
        if not self.body_timeout > 0:
            raise ValueError("body_timeout must be > 0 seconds")
        if not isinstance(self.decode_pool, int) or self.decode_pool < 0:
            raise ValueError(f"decode_pool must be an integer >= 0, got {self.decode_pool!r}")
        if self.decode_pool and self.decoder == "nvjpeg":
            raise ValueError("decode_pool runs CPU decoders; nvjpeg decodes in the inference worker")
        if not isinstance(self.allow_pixels, bool):
            raise TypeError(f"allow_pixels must be a bool, got {type(self.allow_pixels).__name__}")
        if self.batch_decode and self.accelerator != "cuda":
            raise ValueError("batch_decode decodes on the GPU: it needs accelerator='cuda' (and decoder 'nvjpeg')")
        self.preprocess_config()  # validates

    def preprocess_config(self) -> pp.PreprocessConfig:
        return pp.PreprocessConfig(self.decoder, self.reduced, self.normalize_on, self.max_pixels,
                                   pin_memory=self.pin_memory, strict=self.strict_jpeg, batch_decode=self.batch_decode)

    def limits(self) -> Limits:
        return Limits(max_bytes=self.max_bytes, max_in_flight=self.max_in_flight,
                      max_queued_bytes=self.max_queued_bytes, body_timeout=self.body_timeout,
                      max_parts=self.max_parts, retry_after=self.retry_after, allow_pixels=self.allow_pixels)


def make_spool_dir(parent: str | None = None) -> str:
    """A fresh folder for uploads, on tmpfs (/dev/shm) where there is one: spooled uploads stay in memory
    once, with no disk I/O."""
    if parent is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        parent = "/dev/shm"
    return tempfile.mkdtemp(prefix="effllm-uploads-", dir=parent)


def make_server(cfg: ServerConfig, spool_dir: str | None = None) -> ls.LitServer:
    pre = cfg.preprocess_config()
    api = VisionAPI(cfg.model, pre, max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout,
                    threads=cfg.threads, pretrained=cfg.pretrained, allow_pixels=cfg.allow_pixels)
    decode = (cfg.decode_pool, cfg.model, pre) if cfg.decode_pool else None
    return VisionServer(api, limits=cfg.limits(), spool_dir=spool_dir or make_spool_dir(cfg.spool_dir), decode=decode,
                        accelerator=cfg.accelerator, devices=1, workers_per_device=cfg.workers,
                        timeout=cfg.request_timeout, max_payload_size=cfg.max_bytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start the server in its own process group on a free loopback port; ``with`` yields its base URL
    once ``/health`` answers, and stops the whole group (HTTP process and workers) on exit."""

    def __init__(self, cfg: ServerConfig | None = None, *, port: int | None = None, startup_timeout: float = 180,
                 log_path: str | None = None, **overrides):
        if cfg is not None and overrides:
            raise ValueError("pass either a ServerConfig or keyword overrides, not both")
        self._init_process(cfg or ServerConfig(**overrides), port, startup_timeout, log_path)

    def _init_process(self, cfg, port: int | None, startup_timeout: float, log_path: str | None) -> None:
        """The state every managed process has (a subclass with another config calls this alone)."""
        self.cfg = cfg
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout, self.log_path = startup_timeout, log_path
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The command line of the process (a subclass serves something else the same way)."""
        return [sys.executable, "-m", "effllm_lib.serving.server", "--port", str(self.port),
                "--config", json.dumps(asdict(self.cfg)), "--spool", self.spool]

    def launch(self) -> None:
        """Start the process without waiting for it (``start`` = ``launch`` + wait until healthy), so that
        several servers can boot at once."""
        if self.proc is not None:
            return
        # the upload spool folder is made here and removed in stop(): a server ended by a signal cannot
        # clean up after itself
        self.spool = make_spool_dir(getattr(self.cfg, "spool_dir", None))
        log = open(self.log_path or os.devnull, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        log.close()
        self._launched = time.monotonic()

    def start(self) -> str:
        self.launch()
        deadline = self._launched + self.startup_timeout
        while True:  # ask at least once: a process launched long ago (booting beside others) may be up already
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200 and r.read() == b"ok":
                        return self.url
            except OSError:
                pass
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not become healthy within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)  # in case it was paused
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group (start_new_session)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.spool, ignore_errors=True)

    def pause(self) -> None:
        """SIGSTOP the server's processes: an idle LitServe worker polls its queue every millisecond, so
        servers waiting their turn in a comparison would otherwise take CPU from the one being measured."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the live processes of the server's session (the HTTP
        process and its workers), read from /proc: a cost measure that other jobs on a shared machine
        disturb far less than wall-clock throughput."""
        if self.proc is None:
            raise RuntimeError("server is not running")
        total, tick = 0, os.sysconf("SC_CLK_TCK")
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid:  # field 6 of stat: session id (we started a new session)
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--config", default="{}", help="ServerConfig fields as JSON")
    ap.add_argument("--spool", default=None, help="upload spool folder (default: a fresh one, removed at exit)")
    for f in ("model", "decoder", "normalize_on", "accelerator"):
        ap.add_argument(f"--{f.replace('_', '-')}")
    for f in ("max_batch_size", "workers", "threads", "decode_pool"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    ap.add_argument("--batch-timeout", type=float)
    ap.add_argument("--reduced", action="store_true", default=None)
    ap.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--batch-decode", action="store_true", default=None,
                    help="with --decoder nvjpeg: decode each batch in one nvJPEG call on the GPU")
    args = ap.parse_args(argv)
    fields = json.loads(args.config)
    fields.update({k: v for k, v in vars(args).items() if k not in ("host", "port", "config", "spool") and v is not None})
    cfg = ServerConfig(**fields)
    spool = args.spool
    if spool is None:
        spool = make_spool_dir(cfg.spool_dir)
        atexit.register(shutil.rmtree, spool, ignore_errors=True)  # best effort: not on a signal
    make_server(cfg, spool).run(host=args.host, port=args.port, num_api_servers=cfg.api_servers, log_level="warning",
                         generate_client_file=False)


if __name__ == "__main__":
    main()
