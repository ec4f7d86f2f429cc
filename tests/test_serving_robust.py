"""The server as an operator probes it: malformed requests of every kind get a 4xx with a message (never a
500), crafted payloads fail alone inside a batch, admission limits answer 503 with Retry-After, a slow
body gets a 408, uploads are spooled and removed, /metrics counts what happened, and a bounded flood of
good and bad requests gets every good request its 200.

Real HTTP against the real server in its own process (raw sockets where a client must misbehave)."""

import http.client
import io
import json
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from effllm_lib.serving import loadgen, metrics
from effllm_lib.serving.images import synthetic_jpeg
from effllm_lib.serving.server import Limits, ServerProcess, UploadReader, make_spool_dir

MAX_BYTES = 1_000_000
MAX_IN_FLIGHT = 6
LIMITS = dict(max_bytes=MAX_BYTES, max_in_flight=MAX_IN_FLIGHT, max_queued_bytes=2_500_000, body_timeout=3.0,
              max_parts=3)


@pytest.fixture(scope="module")
def spool_parent(tmp_path_factory):
    return str(tmp_path_factory.mktemp("spool"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, spool_parent):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(model="mobilenet_v2", pretrained=False, max_batch_size=4, batch_timeout=0.05,
                       spool_dir=spool_parent, log_path=str(log), **LIMITS) as url:
        yield url


def good_jpeg(seed=0):
    return synthetic_jpeg(160, 120, seed=seed)


def request(url, method, body=b"", headers=None, path="/predict", timeout=60):
    """(status, headers, JSON or text) of one request with exactly these headers (http.client adds no
    Content-Length unless given)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def post_form(url, body, ctype, **kw):
    return request(url, "POST", body, {"Content-Type": ctype, "Content-Length": str(len(body))}, **kw)


def form(parts, boundary="b0undary"):
    """A multipart body from [(name, filename or None, content type or None, bytes)]."""
    out = b""
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def two_frame_headers(g: bytes) -> bytes:
    """A small SOF0 header followed by a copy claiming 65000 x 65000: Pillow takes the last (a decompression
    bomb error, not an OSError), the header check takes the first."""
    i = g.index(b"\xff\xc0")
    length = struct.unpack(">H", g[i + 2:i + 4])[0]
    sof = g[i:i + 2 + length]
    huge = sof[:5] + struct.pack(">HH", 65000, 65000) + sof[9:]
    return g[:i + 2 + length] + huge + g[i + 2 + length:]


def npy(shape_text: str, data: bytes = b"") -> bytes:
    """An .npy file whose header claims ``shape_text`` (written by hand: no array of that size exists)."""
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape_text}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data


G = good_jpeg()
MALFORMED = {
    "get": (lambda: ("GET", b"", {}), 405, "POST"),
    "put": (lambda: ("PUT", *loadgen.multipart(G)[:1], {"Content-Type": loadgen.multipart(G)[1]}), 405, "POST"),
    "no_boundary": (lambda: ("POST", *form([("image", "a.jpg", "image/jpeg", G)])[:1],
                             {"Content-Type": "multipart/form-data"}), 400, "boundary"),
    "wrong_boundary": (lambda: ("POST", form([("image", "a.jpg", "image/jpeg", G)], "aaaa")[0],
                                {"Content-Type": "multipart/form-data; boundary=bbbb"}), 400, "malformed multipart"),
    "no_closing_boundary": (lambda: ("POST", form([("image", "a.jpg", "image/jpeg", G)])[0][:-40],
                                     {"Content-Type": form([])[1]}), 400, "closing boundary"),
    "too_many_parts": (lambda: ("POST", *_ctype(form([("a", None, None, b"1"), ("b", None, None, b"2"),
                                                      ("c", None, None, b"3"), ("image", "a.jpg", "image/jpeg", G)]))),
                       400, "too many parts"),
    "two_files": (lambda: ("POST", *_ctype(form([("image", "a.jpg", "image/jpeg", G),
                                                 ("image", "b.jpg", "image/jpeg", G)]))), 400, "more than one file"),
    "big_text_field": (lambda: ("POST", *_ctype(form([("note", None, None, b"x" * 70_000),
                                                      ("image", "a.jpg", "image/jpeg", G)]))), 413, "field"),
    "no_image_field": (lambda: ("POST", *_ctype(form([("file", "a.jpg", "image/jpeg", G)]))), 422, "'image'"),
    "truncated_with_eoi": (lambda: ("POST", *_ctype(loadgen.multipart(G[: len(G) // 2] + b"\xff\xd9"))), 400,
                           "premature end"),
    "two_frame_headers": (lambda: ("POST", *_ctype(loadgen.multipart(two_frame_headers(G)))), 400, "frame header"),
    "pixels_not_public": (lambda: ("POST", *_ctype(loadgen.multipart(npy("(224, 224, 3)", bytes(224 * 224 * 3)),
                                                                     content_type="application/x-npy"))), 415,
                          "image/jpeg"),
    "chunked": (lambda: ("POST", b"5\r\nhello\r\n0\r\n\r\n", {"Content-Type": form([])[1],
                                                              "Transfer-Encoding": "chunked"}), 411, "Content-Length"),
    "declared_too_large": (lambda: ("POST", b"", {"Content-Type": form([])[1], "Content-Length": str(10**9)}), 413,
                           "exceeds the limit"),
    # uvicorn's own HTTP parser refuses this one before the application sees it
    "bad_length": (lambda: ("POST", b"", {"Content-Type": form([])[1], "Content-Length": "12abc"}), 400,
                   "Invalid HTTP request"),
}


def _ctype(body_ctype):
    body, ctype = body_ctype
    return body, {"Content-Type": ctype}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_a_4xx_with_a_message(server, case):
    make, status, words = MALFORMED[case]
    method, body, headers = make()
    if body and "Transfer-Encoding" not in headers and "Content-Length" not in headers:
        headers["Content-Length"] = str(len(body))
    got, hdrs, reply = request(server, method, body, headers)
    assert got == status, reply
    assert words in (reply["detail"] if isinstance(reply, dict) else reply) or words in hdrs.get("allow", "")
    assert post_form(server, *loadgen.multipart(G))[0] == 200  # and the server keeps serving


def test_crafted_payloads_fail_alone_inside_batches(server):
    """Good requests and every kind of bad image sent at the same moment share batches (batch size 4, 50 ms
    window); each bad one gets its 4xx, every good one its 200 and the right answer."""
    ref = post_form(server, *loadgen.multipart(G))[2]["result"]["top5"]
    bad = [loadgen.multipart(G[: len(G) // 2] + b"\xff\xd9"), loadgen.multipart(two_frame_headers(G)),
           loadgen.multipart(G[:2] + bytes(300)), loadgen.multipart(b"GIF89a" + bytes(50))]
    jobs = [("good", loadgen.multipart(G)) if i % 2 == 0 else ("bad", bad[(i // 2) % len(bad)]) for i in range(MAX_IN_FLIGHT)]
    out, barrier = [None] * len(jobs), threading.Barrier(len(jobs))

    def go(i):
        barrier.wait()
        out[i] = post_form(server, *jobs[i][1])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (kind, _), (status, _, reply) in zip(jobs, out):
        if kind == "good":
            assert status == 200 and reply["result"]["top5"] == ref, reply
        else:
            assert 400 <= status < 500, reply
    assert max(r[2]["batch_size"] for (k, _), r in zip(jobs, out) if k == "good") > 1  # they did share batches


def _hold(url, content_length: int, sent: bytes = b"--b0undary\r\n"):
    """A connection that sent its headers and the first bytes of a body, then stalls (a slow client)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {form([])[1]}\r\n"
              f"Content-Length: {content_length}\r\n\r\n".encode() + sent)
    return s


def _scrape(url) -> dict:
    return metrics.parse(request(url, "GET", path="/metrics")[2])


def _wait_in_flight(url, n, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _scrape(url)[("effllm_requests_in_flight", ())] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"never saw {n} requests in flight")


def test_requests_over_the_in_flight_cap_get_503_with_retry_after(server):
    held = [_hold(server, 5000) for _ in range(MAX_IN_FLIGHT)]
    try:
        _wait_in_flight(server, MAX_IN_FLIGHT)
        status, headers, reply = post_form(server, *loadgen.multipart(G))
        assert status == 503 and headers["retry-after"] == "1" and "in flight" in reply["detail"]
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 30  # the held requests end (disconnect) and free their places
    while post_form(server, *loadgen.multipart(G))[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert _scrape(server)[("effllm_requests_rejected_total", (("cause", "in_flight_full"),))] >= 1


def test_requests_over_the_queued_bytes_cap_get_503_before_sending_their_body(server):
    held = [_hold(server, 1_000_000) for _ in range(2)]  # 2.0 MB declared of the 2.5 MB allowed
    try:
        _wait_in_flight(server, 2)
        host, port = server.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:  # headers only: no body is needed
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {form([])[1]}\r\n"
                      f"Content-Length: 600000\r\n\r\n".encode())
            head = _read_response(s)
        assert head.startswith("HTTP/1.1 503") and "retry-after: 1" in head.lower() and "bytes queued" in head
        assert post_form(server, *loadgen.multipart(G))[0] == 200  # a small request still fits
    finally:
        for s in held:
            s.close()


def _read_response(sock) -> str:
    """Headers and body of one response: the server may send them in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode("latin-1")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_body_that_arrives_too_slowly_gets_408(server):
    s = _hold(server, 5000)
    try:
        t0 = time.monotonic()
        s.settimeout(30)
        head = _read_response(s)
        assert head.startswith("HTTP/1.1 408") and "not received within 3 s" in head
        assert time.monotonic() - t0 < 25  # 3 s deadline; generous for a loaded machine
    finally:
        s.close()


def test_uploads_are_spooled_once_and_removed(server, spool_parent):
    for _ in range(3):
        assert post_form(server, *loadgen.multipart(G))[0] == 200
    assert post_form(server, *loadgen.multipart(G[:100]))[0] == 400
    (spool,) = [os.path.join(spool_parent, d) for d in os.listdir(spool_parent)]
    deadline = time.monotonic() + 10
    while os.listdir(spool) and time.monotonic() < deadline:  # removed as each reply goes out
        time.sleep(0.1)
    assert os.listdir(spool) == []


@pytest.mark.parametrize("chunk", [1, 7, 4096, 10**9])
def test_upload_reader_writes_exactly_the_image_bytes(tmp_path, chunk):
    data = os.urandom(20_000) + b"--b0undary" + os.urandom(5000)  # a boundary-like run inside the file
    body, _ = form([("note", None, None, b"hello"), ("image", "a.jpg", "image/jpeg", data)])
    reader = UploadReader(b"b0undary", str(tmp_path), Limits())
    for i in range(0, len(body), chunk):
        reader.write(body[i:i + chunk])
    payload = reader.finish()
    assert payload["content_type"] == "image/jpeg" and payload["bytes"] == len(data)
    with open(payload["path"], "rb") as fh:
        assert fh.read() == data


def test_spool_dir_is_on_tmpfs_where_there_is_one():
    d = make_spool_dir()
    try:
        assert os.path.isdir(d) and (d.startswith("/dev/shm/") or not os.access("/dev/shm", os.W_OK))
    finally:
        os.rmdir(d)


def test_metrics_count_stages_batches_and_rejections(server):
    before = _scrape(server)
    for _ in range(3):
        assert post_form(server, *loadgen.multipart(G))[0] == 200
    assert post_form(server, *loadgen.multipart(b"GIF89a" + bytes(20)))[0] == 415
    assert request(server, "GET")[0] == 405
    after = _scrape(server)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    for stage in ("queue", "decode", "resize", "normalize", "inference", "postprocess", "respond", "server_total"):
        assert delta("effllm_request_stage_seconds_count", (("stage", stage),)) == 3, stage
    assert delta("effllm_batch_size_count") == 3
    assert delta("effllm_requests_rejected_total", (("cause", "bad_image"),)) == 1
    assert delta("effllm_requests_rejected_total", (("cause", "method"),)) == 1
    assert delta("effllm_requests_total", (("code", "200"),)) == 3
    # each stage's histogram sums to no more than the request's server-side total
    stages = sum(delta("effllm_request_stage_seconds_sum", (("stage", s),)) for s in metrics.SERVER_STAGES)
    assert 0 < stages <= delta("effllm_request_stage_seconds_sum", (("stage", "server_total"),)) + 1e-6


def test_bounded_flood_of_good_and_bad_requests(server):
    """60 requests from 9 clients (1.5 x the in-flight cap), a third of them bad in assorted ways. Clients
    honour Retry-After on a 503 (for up to 2 minutes each); every good request must end with its 200 and the
    right answer, every bad one with its 4xx."""
    import random

    bad_bodies = [loadgen.multipart(G[: len(G) // 2] + b"\xff\xd9"), loadgen.multipart(two_frame_headers(G)),
                  form([("a", None, None, b"1")] * 3 + [("image", "a.jpg", "image/jpeg", G)]),
                  loadgen.multipart(G, content_type="text/plain"), loadgen.multipart(G[:50])]
    refs = {k: post_form(server, *loadgen.multipart(good_jpeg(k)))[2]["result"]["top5"] for k in range(3)}
    jobs = [("good", i % 3) if i % 3 else ("bad", bad_bodies[i % len(bad_bodies)]) for i in range(60)]
    results, lock, nxt, busy = [None] * len(jobs), threading.Lock(), [0], [0]
    rng = random.Random(0)

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(jobs):
                return
            kind, what = jobs[i]
            body = loadgen.multipart(good_jpeg(what)) if kind == "good" else what
            deadline = time.monotonic() + 120
            while True:
                status, headers, reply = post_form(server, *body)
                if status != 503 or time.monotonic() > deadline:
                    break
                with lock:
                    busy[0] += 1
                    pause = float(headers.get("retry-after", 1)) * rng.uniform(0.1, 0.5)
                time.sleep(pause)
            results[i] = (status, reply)

    threads = [threading.Thread(target=client) for _ in range(MAX_IN_FLIGHT * 3 // 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for (kind, what), (status, reply) in zip(jobs, results):
        if kind == "good":
            assert status == 200 and reply["result"]["top5"] == refs[what], reply
        else:
            assert 400 <= status < 500 and status != 408, reply


def test_pixels_header_claiming_an_absurd_shape_is_refused_without_allocating():
    """In-process (the pixels input is off on the public server): the .npy header is read and refused
    before any array exists; a 10^18-element claim must not allocate or raise anything but a 400."""
    from effllm_lib.serving.server import VisionAPI

    api = VisionAPI("mobilenet_v2", pretrained=False, allow_pixels=True)
    api.setup("cpu")
    ok = npy("(224, 224, 3)", bytes(range(256)) * (224 * 224 * 3 // 256))
    bad = {"absurd": npy("(1000000000, 1000000000, 3)"), "negative": npy("(-1, 224, 3)"),
           "short": npy("(224, 224, 3)", bytes(100)), "garbage": b"\x93NUMPY\x01\x00\xff\xff{{{",
           "wrong_dtype": npy("(224, 224, 3)").replace(b"|u1", b"<f8"), "not_npy": b"hello"}
    for name, data in {"ok": ok, **bad}.items():
        item = api._decode_pixels(data, {})
        if name == "ok":
            assert item.error is None and tuple(item.x.shape) == (3, 224, 224)
            ref = np.frombuffer(ok[-224 * 224 * 3:], np.uint8).reshape(224, 224, 3)
            assert np.array_equal(np.load(io.BytesIO(ok)), ref)
        else:
            assert item.error is not None and item.error[0] == 400, name


def test_any_exception_in_decoding_or_inference_fails_that_request_alone(monkeypatch, tmp_path):
    """In-process: a decoder raising an unexpected exception type gives that request a 400; a request whose
    tensor breaks the batch is found by re-running the batch one request at a time."""
    import torch

    from effllm_lib.serving import preprocess as pp
    from effllm_lib.serving.server import VisionAPI

    api = VisionAPI("mobilenet_v2", pretrained=False)
    api.setup("cpu")
    paths = []
    for k in range(3):
        p = tmp_path / f"{k}.jpg"
        p.write_bytes(good_jpeg(k))
        paths.append({"path": str(p), "content_type": "image/jpeg"})
    real = pp.decode

    def flaky(data, *a, **kw):
        if data == good_jpeg(1):
            raise KeyError("a decoder bug")
        return real(data, *a, **kw)

    monkeypatch.setattr(pp, "decode", flaky)
    items = [api.decode_request(p) for p in paths]
    assert items[1].error[0] == 400 and "KeyError" in items[1].error[1]
    items[2].x = torch.zeros(5, 224, 224)  # 5 channels: breaks the batch, and fails alone too
    out = api.predict(api.batch(items))
    assert out[0].error is None and out[0].result["top5"]
    assert out[2].error[0] == 500 and out[1].error[0] == 400
    replies = [api.encode_response(it) for it in out]
    assert [getattr(r, "status_code", 200) for r in replies] == [200, 400, 500]
