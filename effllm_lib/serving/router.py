"""A size-aware HTTP router in front of pools of vision servers.

What it is: a small asynchronous reverse proxy (Starlette on uvicorn, the stack the LitServe servers already
run on, with an ``httpx.AsyncClient`` towards the backends). For each ``POST /predict`` it reads the body,
finds the ``image`` part of the multipart form, reads the JPEG's frame header only (``preprocess.jpeg_size``:
a few hundred bytes, no decode) and forwards the unchanged request to a backend of the pool for that size:

* ``policy="size"``: images of fewer than ``threshold_pixels`` go to the pool ``"small"``, the others to
  ``"large"``; a request whose size cannot be read (not multipart, no image part, not a JPEG, corrupt) goes to
  the ``default_pool``, whose server answers it with its own 4xx;
* ``policy="round_robin"``: every backend of every pool in turn, whatever the size (the same hop, without
  the routing decision: the baseline a size-aware router is compared with).

Within a pool, backends take turns. The backend's reply (status, JSON body, the server's stamp headers)
is passed through unchanged, 4xx included, with ``x-pool`` and ``x-backend`` headers added. A backend that
refuses the connection is skipped for the next of its pool; when none answers the client gets a 502 JSON
reply, and a backend that does not reply within ``timeout`` seconds a 504: the router never hangs.

Why this design: a LitServe worker decodes the requests of a batch one after the other, so in a server fed
a mix of sizes a 1 MP photo waits behind the 15 MP decodes that share its batch and its queue. Separate
pools, each tuned for its sizes (batching for the many cheap small images, no batching for the
decode-bound large ones), keep the small requests fast, and the JPEG header tells the size for free. A
proxy in its own process keeps the servers unchanged; Starlette + httpx are well-kept and pure Python
(httpx and httpcore are the only additions to LitServe's dependencies).

Run one: ``python -m effllm_lib.serving.router --port 9000 --config '{"pools": {"small": [URL], "large":
[URL]}}'``, or from Python ``with RouterProcess(RouterConfig(pools=...)) as url: ...``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from . import preprocess as pp
from .server import DEFAULT_MAX_BYTES, ServerProcess

POLICIES = ("size", "round_robin")
PASSED_HEADERS = ("content-type", "x-received-at", "x-responded-at")
_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?')
_NAME = re.compile(rb'name="([^"]*)"')
_HEAD_PROBE = 256 * 1024  # a JPEG's frame header is almost always within its first few kB (EXIF included)


@dataclass
class RouterConfig:
    pools: dict[str, list[str]] = field(default_factory=dict)
    policy: str = "size"
    threshold_pixels: int = 3_000_000  # >= goes to "large": 1 MP photos are small; 4 and 15 MP ones large
    default_pool: str = "small"
    timeout: float = 130.0  # s for a backend's reply (above the servers' own 120 s queue timeout)
    connect_timeout: float = 2.0
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not isinstance(self.pools, dict) or not self.pools:
            raise ValueError("pools must be a non-empty dict of pool name -> list of backend URLs")
        for name, urls in self.pools.items():
            if isinstance(urls, str) or not urls:
                raise ValueError(f"pool {name!r} needs a non-empty list of backend URLs")
            for u in urls:
                parsed = urlparse(u)
                if parsed.scheme != "http" or not parsed.hostname:
                    raise ValueError(f"pool {name!r}: expected an http://host:port URL, got {u!r}")
        if self.policy == "size":
            missing = {"small", "large"} - set(self.pools)
            if missing:
                raise ValueError(f"policy 'size' needs the pools 'small' and 'large'; missing {sorted(missing)}")
        if self.default_pool not in self.pools:
            self.default_pool = next(iter(self.pools))
        if self.threshold_pixels <= 0 or self.timeout <= 0 or self.connect_timeout <= 0 or self.max_bytes <= 0:
            raise ValueError("threshold_pixels, timeout, connect_timeout and max_bytes must be positive")


# ------------------------------------------------------------------------------------------- routing
def image_part(body: bytes, content_type: str) -> memoryview | None:
    """The bytes of the form field ``image`` of a multipart/form-data body (a view, no copy), or None."""
    m = _BOUNDARY.search(content_type.encode("latin-1"))
    if not content_type.startswith("multipart/form-data") or m is None:
        return None
    delim = b"--" + m.group(1)
    view = memoryview(body)
    pos = body.find(delim)
    while pos >= 0:
        head_start = pos + len(delim)
        if body[head_start:head_start + 2] == b"--":  # closing delimiter
            return None
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            return None
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        headers = body[head_start:head_end]
        for line in headers.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition:"):
                name = _NAME.search(line)
                if name and name.group(1) == b"image":
                    return view[head_end + 4:nxt if nxt >= 0 else len(body)]
        if nxt < 0:
            return None
        pos = nxt + 2
    return None


def image_pixels(body: bytes, content_type: str) -> int | None:
    """Width x height of the request's JPEG from its frame header, or None if it cannot be read."""
    part = image_part(body, content_type)
    if part is None:
        return None
    try:
        try:
            w, h = pp.jpeg_size(part[:_HEAD_PROBE])
        except pp.BadImage:
            if len(part) <= _HEAD_PROBE:
                raise
            w, h = pp.jpeg_size(part)  # a header beyond the probe (huge metadata): read it all
    except pp.BadImage:
        return None
    return w * h


class Router:
    """The routing decision and the backends' turns (no I/O: unit-testable)."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self._turns = {name: itertools.cycle(range(len(urls))) for name, urls in cfg.pools.items()}
        self._all = itertools.cycle([(name, u) for name, urls in cfg.pools.items() for u in urls])

    def choose(self, body: bytes, content_type: str) -> list[tuple[str, str]]:
        """[(pool, backend URL)] to try in order: the chosen backend first, then the rest of its pool."""
        if self.cfg.policy == "round_robin":
            pool, url = next(self._all)
            urls = self.cfg.pools[pool]
            i = urls.index(url)
        else:
            pixels = image_pixels(body, content_type)
            if pixels is None:
                pool = self.cfg.default_pool
            else:
                pool = "large" if pixels >= self.cfg.threshold_pixels else "small"
            urls = self.cfg.pools[pool]
            i = next(self._turns[pool])
        return [(pool, urls[(i + k) % len(urls)]) for k in range(len(urls))]


# ------------------------------------------------------------------------------------------- the app
def make_app(cfg: RouterConfig):
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    router = Router(cfg)
    state = {}

    @asynccontextmanager
    async def lifespan(app):
        timeout = httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            state["client"] = client
            yield

    async def health(request):
        return PlainTextResponse("ok")

    async def backends(request):
        return JSONResponse({"policy": cfg.policy, "pools": cfg.pools, "threshold_pixels": cfg.threshold_pixels})

    async def predict(request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_bytes:
            return JSONResponse({"detail": f"request body of {length} bytes exceeds the limit of "
                                           f"{cfg.max_bytes} bytes"}, status_code=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_bytes:
                return JSONResponse({"detail": f"request body exceeds the limit of {cfg.max_bytes} bytes"},
                                    status_code=413)
            chunks.append(chunk)
        body = b"".join(chunks)
        ctype = request.headers.get("content-type", "")
        headers = {"content-type": ctype} if ctype else {}
        errors = []
        for pool, url in router.choose(body, ctype):
            try:
                resp = await state["client"].post(url + "/predict", content=body, headers=headers)
            except httpx.TimeoutException as exc:
                return JSONResponse({"detail": f"backend {url} (pool {pool}) did not reply within its timeout: "
                                               f"{type(exc).__name__}", "pool": pool, "backend": url},
                                    status_code=504)
            except httpx.ConnectError as exc:  # the request never reached it: the next of the pool may answer
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            except httpx.HTTPError as exc:  # it failed mid-request: do not send the request twice
                return JSONResponse({"detail": f"backend {url} (pool {pool}) failed: {type(exc).__name__}: {exc}",
                                     "pool": pool, "backend": url}, status_code=502)
            out = {k: v for k, v in resp.headers.items() if k in PASSED_HEADERS}
            out.update({"x-pool": pool, "x-backend": url})
            return Response(resp.content, status_code=resp.status_code, headers=out)
        return JSONResponse({"detail": f"no backend of pool {pool!r} is reachable: " + "; ".join(errors),
                             "pool": pool}, status_code=502)

    return Starlette(routes=[Route("/health", health), Route("/backends", backends),
                             Route("/predict", predict, methods=["POST"])], lifespan=lifespan)


class RouterProcess(ServerProcess):
    """The router in its own process group, started, waited for, paused and stopped like a server."""

    def __init__(self, cfg: RouterConfig, *, port: int | None = None, startup_timeout: float = 60,
                 log_path: str | None = None):
        if not isinstance(cfg, RouterConfig):
            raise TypeError(f"RouterProcess needs a RouterConfig, got {type(cfg).__name__}")
        self._init_process(cfg, port, startup_timeout, log_path)  # (ServerProcess.__init__ builds a ServerConfig)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "effllm_lib.serving.router", "--port", str(self.port),
                "--config", json.dumps(asdict(self.cfg))]


def main(argv=None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--config", required=True, help="RouterConfig fields as JSON")
    args = ap.parse_args(argv)
    cfg = RouterConfig(**json.loads(args.config))
    uvicorn.run(make_app(cfg), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
