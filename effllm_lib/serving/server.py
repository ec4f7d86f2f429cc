"""An HTTP inference server for vision models with dynamic batching, built on LitServe.

Why LitServe: it gives an HTTP front end (FastAPI/uvicorn), inference workers in their own processes and
dynamic batching (``max_batch_size``, ``batch_timeout``) with a small dependency set (fastapi, uvicorn,
pyzmq, python-multipart: a few MB of wheels, so it can be carried to the device machine, which has no
internet). Ray Serve's ``ray`` wheel alone is larger than what one device call may carry, and NVIDIA
Triton needs its own server binary and container.

A request is ``POST /predict`` with ``multipart/form-data`` holding a JPEG in the field ``image``. The
reply is JSON: the task's result, the batch size it ran in, and the stamps the profiler turns into
per-stage spans (``profiler.STAMPS``). Bad input gets a 4xx with a message and never disturbs the
other requests of its batch: 411 no Content-Length, 413 too many bytes or pixels, 415 not multipart or
not a JPEG, 400 corrupt or truncated, 422 no ``image`` field.

Run one: ``python -m effllm_lib.serving.server --port 8000 --model mobilenet_v2 --max-batch-size 8``, or
from Python ``with ServerProcess(model=...) as url: ...``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import litserve as ls
import numpy as np
import torch
import torch.nn.functional as F
from fastapi.responses import JSONResponse

from . import preprocess as pp
from .models import build
from .profiler import now

DEFAULT_MAX_BYTES = 32 * 2**20
PIXELS_TYPE = "application/x-npy"  # pre-decoded pixels: the 'without preprocessing' baseline


# ------------------------------------------------------------------------------------------ HTTP guard
class ImageRequestGuard:
    """ASGI middleware in the HTTP process: rejects wrong content types and oversized bodies before they
    reach a worker, and stamps when the body was fully received (``x-received-at``) and when the reply
    left (``x-responded-at``) as response headers."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BYTES, paths: tuple[str, ...] = ("/predict",)):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get(b"content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return await _reply(send, 415, f"expected multipart/form-data with a JPEG in the field 'image', "
                                           f"got content type {ctype or 'none'!r}")
        length = headers.get(b"content-length")
        if length is None:
            return await _reply(send, 411, "a Content-Length header is required")
        if not length.isdigit():
            return await _reply(send, 400, f"invalid Content-Length {length!r}")
        if int(length) > self.max_bytes:
            return await _reply(send, 413, f"request body of {length} bytes exceeds the limit of "
                                           f"{self.max_bytes} bytes")
        stamp = {}

        async def stamped_receive():
            msg = await receive()
            if msg["type"] == "http.request" and not msg.get("more_body", False):
                stamp["received"] = now()
            return msg

        async def stamped_send(msg):
            if msg["type"] == "http.response.start" and "received" in stamp:
                msg = dict(msg)
                msg["headers"] = list(msg.get("headers", [])) + [
                    (b"x-received-at", repr(stamp["received"]).encode()),
                    (b"x-responded-at", repr(now()).encode())]
            await send(msg)

        await self.app(scope, stamped_receive, stamped_send)


async def _reply(send, status: int, detail: str):
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------- the LitAPI
@dataclass
class Item:
    """One request inside the worker."""
    x: torch.Tensor | None
    image_size: tuple[int, int]
    stamps: dict = field(default_factory=dict)
    error: tuple[int, str] | None = None
    result: dict | None = None
    batch_size: int = 0


class VisionAPI(ls.LitAPI):
    """Decode -> resize -> normalize per request; stack, copy, infer per batch; postprocess per request."""

    def __init__(self, model: str = "mobilenet_v2", pre: pp.PreprocessConfig | None = None, *,
                 max_batch_size: int = 8, batch_timeout: float = 0.005, threads: int = 1,
                 pretrained: bool | None = None):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_name, self.pre = model, pre or pp.PreprocessConfig()
        self.threads, self.pretrained = threads, pretrained

    def setup(self, device):
        if device.startswith("cpu"):
            # one intra-op thread: on a shared 2-core box more threads spin against each other
            torch.set_num_threads(self.threads)
        self.dev = torch.device(device)
        if self.pre.decoder == "nvjpeg" and self.dev.type != "cuda":
            raise RuntimeError("decoder 'nvjpeg' needs a CUDA device")
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
        upload = request.get("image") if hasattr(request, "get") else None
        if upload is None or not hasattr(upload, "file"):
            return Item(None, (0, 0), st, (422, "the form needs a file field named 'image'"))
        ctype = (upload.content_type or "").split(";")[0].strip().lower()
        if ctype not in ("image/jpeg", "image/jpg", "application/octet-stream", PIXELS_TYPE):
            return Item(None, (0, 0), st, (415, f"expected an image/jpeg file, got {ctype or 'no content type'}"))
        data = upload.file.read()
        if ctype == PIXELS_TYPE:
            return self._decode_pixels(data, st)
        try:
            size = pp.check_jpeg(data, self.pre.max_pixels)
            img = pp.decode(data, self.pre.decoder, target=self.spec.input_size, reduced=self.pre.reduced,
                            device=self.dev)
            self._sync()
            st["decoded"] = now()
            img = pp.resize(img, self.spec.input_size)
            self._sync()
            st["resized"] = now()
            x = pp.to_uint8_chw(img)
            if self.pre.normalize_on == "host":
                x = pp.normalize(x, self.spec.mean, self.spec.std)
            self._sync()
            st["normalized"] = now()
        except pp.BadImage as exc:
            return Item(None, (0, 0), st, (exc.status, str(exc)))
        return Item(x, size, st)

    def _decode_pixels(self, data: bytes, st: dict) -> Item:
        """The "no preprocessing" mode: the client sends pixels already decoded and resized to the model's
        input (an .npy uint8 H x W x 3 array), so only normalization and the copy remain."""
        h, w = self.spec.input_size
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            return Item(None, (0, 0), st, (400, f"corrupt pixel array: {exc}"))
        if arr.dtype != np.uint8 or arr.shape != (h, w, 3):
            return Item(None, (0, 0), st, (400, f"pixel array must be uint8 of shape ({h}, {w}, 3), got "
                                                f"{arr.dtype} {arr.shape}"))
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
        ok = [it for it in items if it.error is None]
        if ok:
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
        return items[0] if single else items

    def unbatch(self, items):
        return items

    def encode_response(self, item):
        if item.error is not None:
            status, detail = item.error
            return JSONResponse(status_code=status, content={"detail": detail})
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

    def __post_init__(self):
        if self.max_batch_size < 1 or self.workers < 1 or self.api_servers < 1 or self.threads < 1:
            raise ValueError("max_batch_size, workers, api_servers and threads must be at least 1")
        if self.batch_timeout < 0:
            raise ValueError("batch_timeout must be >= 0")
        self.preprocess_config()  # validates

    def preprocess_config(self) -> pp.PreprocessConfig:
        return pp.PreprocessConfig(self.decoder, self.reduced, self.normalize_on, self.max_pixels,
                                   pin_memory=self.pin_memory)


def make_server(cfg: ServerConfig) -> ls.LitServer:
    pre = cfg.preprocess_config()
    api = VisionAPI(cfg.model, pre, max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout,
                    threads=cfg.threads, pretrained=cfg.pretrained)
    return ls.LitServer(api, accelerator=cfg.accelerator, devices=1, workers_per_device=cfg.workers,
                        timeout=cfg.request_timeout, max_payload_size=cfg.max_bytes, middlewares=[(ImageRequestGuard, {"max_bytes": cfg.max_bytes})])


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
                "--config", json.dumps(asdict(self.cfg))]

    def launch(self) -> None:
        """Start the process without waiting for it (``start`` = ``launch`` + wait until healthy), so that
        several servers can boot at once."""
        if self.proc is not None:
            return
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
    for f in ("model", "decoder", "normalize_on", "accelerator"):
        ap.add_argument(f"--{f.replace('_', '-')}")
    for f in ("max_batch_size", "workers", "threads"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    ap.add_argument("--batch-timeout", type=float)
    ap.add_argument("--reduced", action="store_true", default=None)
    ap.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args(argv)
    fields = json.loads(args.config)
    fields.update({k: v for k, v in vars(args).items() if k not in ("host", "port", "config") and v is not None})
    cfg = ServerConfig(**fields)
    make_server(cfg).run(host=args.host, port=args.port, num_api_servers=cfg.api_servers, log_level="warning",
                         generate_client_file=False)


if __name__ == "__main__":
    main()
