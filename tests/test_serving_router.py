"""The size-aware router: multipart parsing, the routing decision, and end to end through a RouterProcess in
front of two tiny backends (routing by JPEG size, 4xx passthrough, 502 for a dead backend, 504 for a slow one)."""

import asyncio
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from effllm_lib.serving import loadgen, preprocess as pp
from effllm_lib.serving.images import synthetic_jpeg
from effllm_lib.serving.router import Router, RouterConfig, RouterProcess, image_part, image_pixels
from effllm_lib.serving.server import ImageRequestGuard, Limits, free_port

THRESHOLD = 10_000  # pixels: 64x64 (4096) is small, 200x100 (20000) large
SLOW_WIDTH = 333  # a backend sleeps on images of this width (to test the router's timeout)


def jpeg(w, h):
    return synthetic_jpeg(w, h, seed=w + h, quality=70)


# ------------------------------------------------------------------------------------------ pure functions
def test_image_part_finds_the_image_field_among_others():
    data = jpeg(64, 64)
    body, ctype = loadgen.multipart(data)
    assert bytes(image_part(body, ctype)) == data
    # another field first, then the image: built by hand (independent of loadgen.multipart)
    b = "XyZ"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    assert bytes(image_part(body, f"multipart/form-data; boundary={b}")) == data
    assert image_pixels(body, f"multipart/form-data; boundary={b}") == 64 * 64
    assert image_part(body, "application/json") is None
    no_image = f"--{b}\r\nContent-Disposition: form-data; name=\"photo\"\r\n\r\nx\r\n--{b}--\r\n".encode()
    assert image_part(no_image, f"multipart/form-data; boundary={b}") is None
    assert image_pixels(loadgen.multipart(b"not a jpeg")[0], loadgen.multipart(b"x")[1]) is None


def test_size_policy_and_round_robin_choices():
    small, large = loadgen.multipart(jpeg(64, 64)), loadgen.multipart(jpeg(200, 100))
    r = Router(RouterConfig({"small": ["http://a:1", "http://b:1"], "large": ["http://c:1"]},
                            threshold_pixels=THRESHOLD))
    assert [r.choose(*small)[0] for _ in range(3)] == [("small", "http://a:1"), ("small", "http://b:1"),
                                                       ("small", "http://a:1")]
    assert r.choose(*large) == [("large", "http://c:1")]
    assert r.choose(*small)[1] == ("small", "http://a:1")  # the rest of the pool follows as fallback
    assert r.choose(b"junk", "text/plain")[0][0] == "small"  # unreadable -> default pool
    rr = Router(RouterConfig({"small": ["http://a:1"], "large": ["http://c:1"]}, policy="round_robin"))
    assert [rr.choose(*large)[0][1] for _ in range(4)] == ["http://a:1", "http://c:1"] * 2


def test_config_validation():
    with pytest.raises(ValueError, match="policy"):
        RouterConfig({"small": ["http://a:1"], "large": ["http://b:1"]}, policy="random")
    with pytest.raises(ValueError, match="missing"):
        RouterConfig({"small": ["http://a:1"]})
    with pytest.raises(ValueError, match="URL"):
        RouterConfig({"small": ["a:1"], "large": ["http://b:1"]})
    with pytest.raises(ValueError, match="non-empty"):
        RouterConfig({"all": []}, policy="round_robin")
    with pytest.raises(TypeError):
        RouterProcess({"pools": {}})


# ------------------------------------------------------------------------------------------ end to end
def backend_app(name):
    async def predict(request):
        form = await request.form()
        data = await form["image"].read()
        try:
            w, h = pp.check_jpeg(data)
        except pp.BadImage as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        if w == SLOW_WIDTH:
            await asyncio.sleep(5)
        return JSONResponse({"backend": name, "size": [w, h]})

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                            Route("/health", lambda r: PlainTextResponse("ok"))])
    return ImageRequestGuard(app, Limits(max_bytes=1_000_000))


@pytest.fixture(scope="module")
def backends():
    servers, urls = [], {}
    for name in ("A", "B"):
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(backend_app(name), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        servers.append(srv)
        urls[name] = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not all(s.started for s in servers):
        assert time.monotonic() < deadline, "test backends did not start"
        time.sleep(0.05)
    yield urls
    for s in servers:
        s.should_exit = True


@pytest.fixture(scope="module")
def routers(backends, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("router") / "router.log")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    main = RouterProcess(RouterConfig({"small": [backends["A"]], "large": [backends["B"]]},
                                      threshold_pixels=THRESHOLD, timeout=1.0), log_path=log)
    down = RouterProcess(RouterConfig({"small": [dead, backends["A"]], "large": [dead]},
                                      threshold_pixels=THRESHOLD, timeout=1.0), log_path=log)
    main.launch(), down.launch()
    try:
        yield main.start(), down.start()
    finally:
        main.stop(), down.stop()


def post(url, data=None, body=None, ctype=None):
    if data is not None:
        body, ctype = loadgen.multipart(data)
    return loadgen.Client(url, timeout=20).post("/predict", body, ctype)


def test_routes_by_jpeg_size(routers):
    url = routers[0]
    status, headers, reply = post(url, jpeg(64, 64))
    assert (status, reply["backend"], reply["size"], headers["x-pool"]) == (200, "A", [64, 64], "small")
    status, headers, reply = post(url, jpeg(200, 100))
    assert (status, reply["backend"], reply["size"], headers["x-pool"]) == (200, "B", [200, 100], "large")
    assert "x-received-at" in headers  # the backend's stamp headers pass through


def test_backend_4xx_passes_through(routers):
    url = routers[0]
    status, _, reply = post(url, body=b"{}", ctype="application/json")  # the guard's 415
    assert status == 415 and "multipart/form-data" in reply["detail"]
    data = jpeg(64, 64)
    status, _, reply = post(url, data[: len(data) // 2])  # truncated: routed by its header, the backend's 400
    assert status == 400 and "truncated" in reply["detail"]
    status, _, reply = post(url, b"GIF89a....")
    assert status == 415 and "not a JPEG" in reply["detail"]


def test_dead_backend_is_skipped_or_a_502(routers):
    url = routers[1]
    t = time.monotonic()
    status, headers, reply = post(url, jpeg(64, 64))  # dead first in its pool, then A
    assert status == 200 and reply["backend"] == "A"
    status, _, reply = post(url, jpeg(200, 100))  # the large pool has only the dead backend
    assert status == 502 and "no backend of pool 'large'" in reply["detail"]
    assert time.monotonic() - t < 10


def test_slow_backend_is_a_504_not_a_hang(routers):
    t = time.monotonic()
    status, _, reply = post(routers[0], jpeg(SLOW_WIDTH, 100))
    assert status == 504 and "did not reply" in reply["detail"]
    assert time.monotonic() - t < 4


def test_summarize_by_size_hand_case():
    from effllm_lib.serving.experiments import summarize_by_size

    recs = [{"image": "small:a", "status": 200, "sent": 0.0, "done": 0.1, "batch_size": 1},
            {"image": "small:b", "status": 200, "sent": 0.1, "done": 0.4, "batch_size": 1},
            {"image": "large:c", "status": 200, "sent": 0.0, "done": 2.0, "batch_size": 1},
            {"image": "large:d", "status": 400, "sent": 0.0, "done": 0.5, "error": "bad"}]
    s = summarize_by_size(recs)
    assert (s["ok"], s["errors"], s["wall_s"]) == (3, 1, 2.0)
    assert s["small_ok"] == 2 and s["small_throughput_rps"] == pytest.approx(1.0)  # 2 over the whole 2 s
    assert s["small_p50_ms"] == pytest.approx(200.0)  # median of 100 and 300 ms
    assert (s["large_ok"], s["large_errors"], s["large_p50_ms"]) == (1, 1, pytest.approx(2000.0))
    with pytest.raises(ValueError, match="no medium"):
        summarize_by_size(recs, ("small", "medium"))
