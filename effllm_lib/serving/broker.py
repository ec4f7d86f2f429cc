"""Message brokers between two DNNs, and a two-DNN pipeline (detector -> classifier on the crops).

Three ways to hand a crop (a 224 x 224 x 3 uint8 array) from the detector to the classifier:

* ``QueueBroker``  - an in-process ``queue.Queue``: both stages are threads of one process, the message is
                     a reference, nothing is copied or serialized.
* ``ShmBroker``    - shared memory between processes: a ring of fixed-size slots in one
                     ``multiprocessing.shared_memory`` block; the producer copies the pixels into a free
                     slot and sends only (slot, shape) through a pipe; the slot is freed on ``ack``.
* ``RedisBroker``  - a Redis stream on loopback with a consumer group: the pixels are serialized into the
                     message, sent over TCP, stored, and read back.

Exactly once in effect (Redis). Redis streams deliver at least once: a message stays pending until it is
acknowledged, so a consumer or broker crash re-delivers it, and a producer that retries an XADD whose reply
was lost stores it twice. So every message carries its own id (``put(..., mid=)``), and a consumer
finishes a message with ``complete``: one MULTI that stores its result under its id in a results hash
(HSETNX: the first result of an id wins, a repeat changes nothing), acknowledges and deletes it. A
consumer skips a message whose id already has a result, reclaims the pending messages of a dead consumer
(XAUTOCLAIM, once they are ``claim_idle`` s old), and the collector waits for the *set* of accepted ids
(``collect``), never a count. With ``appendfsync always`` an accepted message (XADD returned) and a stored
result survive a SIGKILL of the broker; ``everysec`` may lose the last second of both, ``no`` more.

``RedisServer`` starts ``redis-server`` (Debian package; see apt.txt) on a free loopback port in a
temporary folder and can restart it mid-run. ``run_pipeline`` runs the detector -> classifier pipeline over
a broker and returns one record per crop with the stamps the broker share is computed from;
``durability_cost`` measures what each ``appendfsync`` setting costs a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing import get_context, shared_memory
# profiler.now's clock (CLOCK_MONOTONIC: one time line for all processes), without importing the profiler's
# pandas into every spawned consumer
from time import monotonic as now
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

APPENDFSYNC = ("always", "everysec", "no")


@dataclass
class Message:
    id: str  # the message's own id, given by the producer: what makes a repeat recognisable
    array: np.ndarray
    meta: dict
    entry: str = ""  # where the broker holds it (Redis stream entry id, shared-memory slot)
    redelivered: bool = False  # read again from the pending list, or reclaimed from a dead consumer


# ------------------------------------------------------------------------------------------- redis-server
def redis_available() -> bool:
    return shutil.which("redis-server") is not None


class RedisServer:
    """``redis-server`` on 127.0.0.1 at a free port, persisting to an append-only file in its own folder
    (``appendfsync``: fsync on every write by default), in its own process group. ``restart(hard=True)``
    SIGKILLs it and starts it again on the same port and data."""

    def __init__(self, port: int | None = None, workdir: str | None = None, appendfsync: str = "always"):
        if not redis_available():
            raise RuntimeError("redis-server is not installed (Debian package redis-server; see apt.txt)")
        if appendfsync not in APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {', '.join(APPENDFSYNC)}, got {appendfsync!r}")
        from .server import free_port  # (lazily: a spawned consumer need not import the HTTP server)

        self.port, self.appendfsync = port or free_port(), appendfsync
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="effllm-redis-")
        self.workdir = os.path.abspath(workdir or self._tmp.name)  # redis-server chdirs into it
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
                "--save", "", "--appendonly", "yes", "--appendfsync", self.appendfsync, "--protected-mode", "yes",
                "--daemonize", "no", "--loglevel", "warning", "--logfile", os.path.join(self.workdir, "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {self.proc.returncode}; see "
                                       f"{self.workdir}/redis.log")
                try:
                    if client.ping():
                        # an AOF replay after a restart finishes before PING answers
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("redis-server did not answer PING within 20 s")

    def stop(self, hard: bool = False) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.proc = None

    def restart(self, hard: bool = True) -> None:
        self.stop(hard=hard)
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


# ----------------------------------------------------------------------------------------------- brokers
class QueueBroker:
    """In-process queue: the consumer gets the producer's very array (no copy, no serialization). Results
    go back through a second queue."""

    kind = "queue"

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.out: queue.Queue = queue.Queue()

    def put(self, array: np.ndarray, meta: dict, mid: str | None = None) -> str:
        mid = mid or uuid.uuid4().hex
        self.q.put(Message(mid, array, meta))
        return mid

    def get(self, timeout: float = 1.0) -> Message | None:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, msg: Message) -> None:
        pass

    def is_done(self, msg: Message) -> bool:
        return False  # nothing re-delivers: a message is seen once

    def complete(self, msg: Message, record: dict | None) -> None:
        if record is not None:
            self.out.put(record)
        self.ack(msg)

    def collect(self, ids, timeout: float = 300.0) -> dict[str, dict]:
        return _collect_from_queue(self.out, ids, timeout)

    def connect(self):
        return self


def _collect_from_queue(out, ids, timeout: float) -> dict[str, dict]:
    """Records from ``out`` until every id in ``ids`` has one (a repeat of an id is dropped)."""
    want, got = set(ids), {}
    deadline = time.monotonic() + timeout
    while not want <= got.keys():
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"timed out with {len(want & got.keys())} of {len(want)} results")
        try:
            rec = out.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        got.setdefault(rec["id"], rec)
    return {k: got[k] for k in want}


class ShmBroker:
    """Shared-memory ring of ``slots`` slots of ``slot_bytes``; pipes carry only (slot, shape, dtype, meta).
    Picklable, so a spawned consumer process can ``connect()`` to it."""

    kind = "shm"

    def __init__(self, slots: int = 64, slot_bytes: int = 224 * 224 * 3, ctx=None):
        ctx = ctx or get_context("spawn")
        self.slot_bytes, self.slots = slot_bytes, slots
        self.shm = shared_memory.SharedMemory(create=True, size=slots * slot_bytes)
        self.free, self.ready, self.out = ctx.Queue(), ctx.Queue(), ctx.Queue()
        for i in range(slots):
            self.free.put(i)
        self._owner = True

    def __getstate__(self):
        return {"name": self.shm.name, "slot_bytes": self.slot_bytes, "slots": self.slots, "free": self.free,
                "ready": self.ready, "out": self.out}

    def __setstate__(self, st):
        self.__dict__.update(st)
        self.shm = shared_memory.SharedMemory(name=st["name"])
        self._owner = False

    def connect(self):
        return self

    def put(self, array: np.ndarray, meta: dict, mid: str | None = None) -> str:
        if array.nbytes > self.slot_bytes:
            raise ValueError(f"message of {array.nbytes} bytes exceeds the slot size {self.slot_bytes}")
        mid = mid or uuid.uuid4().hex
        slot = self.free.get(timeout=60)  # back-pressure: waits for the consumer to free a slot
        view = np.ndarray(array.shape, array.dtype, buffer=self.shm.buf, offset=slot * self.slot_bytes)
        view[...] = array
        self.ready.put((mid, slot, array.shape, array.dtype.str, meta))
        return mid

    def get(self, timeout: float = 1.0) -> Message | None:
        try:
            mid, slot, shape, dtype, meta = self.ready.get(timeout=timeout)
        except queue.Empty:
            return None
        view = np.ndarray(shape, np.dtype(dtype), buffer=self.shm.buf, offset=slot * self.slot_bytes)
        return Message(mid, view.copy(), meta, str(slot))  # copy out: the slot is reused after ack

    def ack(self, msg: Message) -> None:
        self.free.put(int(msg.entry))

    def is_done(self, msg: Message) -> bool:
        return False

    def complete(self, msg: Message, record: dict | None) -> None:
        if record is not None:
            self.out.put(record)
        self.ack(msg)

    def collect(self, ids, timeout: float = 300.0) -> dict[str, dict]:
        return _collect_from_queue(self.out, ids, timeout)

    def close(self):
        self.shm.close()
        if self._owner:
            self.shm.unlink()


class RedisBroker:
    """A Redis stream with a consumer group, exactly once in effect (module docstring).

    ``put`` returns only once Redis accepted the message (retrying across a broker restart for up to
    ``retry_for`` s). ``get`` first re-reads this consumer's own pending messages after any reconnect, then
    every ``claim_idle / 2`` s reclaims one message that another consumer left pending for ``claim_idle``
    s (XAUTOCLAIM), then reads new ones. ``complete`` stores the result and acknowledges in one transaction;
    ``collect`` reads the results of a set of ids."""

    kind = "redis"

    def __init__(self, url: str, stream: str = "crops", group: str = "classifier", consumer: str = "c0",
                 retry_for: float = 30.0, claim_idle: float = 5.0):
        self.url, self.stream, self.group, self.consumer, self.retry_for = url, stream, group, consumer, retry_for
        self.claim_idle = claim_idle
        self.results_key, self.deliveries_key = f"{stream}:results", f"{stream}:deliveries"
        self._r = None
        self._recover, self._last_claim, self._claim_cursor = True, 0.0, "0-0"

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_r"} | {"_r": None}

    def with_consumer(self, consumer: str) -> "RedisBroker":
        """The same stream and group under another consumer name (a fresh process of the stage)."""
        return RedisBroker(self.url, self.stream, self.group, consumer, self.retry_for, self.claim_idle)

    def connect(self):
        import redis

        self._r = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        self._retrying(self._ensure_group)
        return self

    def _ensure_group(self):
        import redis

        try:
            self._r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _retrying(self, fn):
        """Run ``fn`` until it succeeds, reconnecting across a broker restart for up to ``retry_for`` s."""
        import redis

        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                self._recover = True
                time.sleep(0.05)

    def put(self, array: np.ndarray, meta: dict, mid: str | None = None) -> str:
        mid = mid or uuid.uuid4().hex
        fields = {"id": mid, "d": array.tobytes(),
                  "m": json.dumps({**meta, "shape": array.shape, "dtype": array.dtype.str})}
        self._retrying(lambda: self._r.xadd(self.stream, fields))
        return mid

    def _message(self, entry, fields, redelivered: bool) -> Message:
        meta = json.loads(fields[b"m"])
        arr = np.frombuffer(fields[b"d"], dtype=np.dtype(meta.pop("dtype"))).reshape(meta.pop("shape"))
        return Message(fields[b"id"].decode(), arr, meta, entry.decode(), redelivered)

    def get(self, timeout: float = 1.0) -> Message | None:
        def read():
            if self._recover:
                self._ensure_group()  # the group may be new if the broker lost everything
                got = self._r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=1)
                if got and got[0][1]:
                    return (*got[0][1][0], True)
                self._recover = False
            if time.monotonic() - self._last_claim >= self.claim_idle / 2:
                claimed = self._claim()
                if claimed is not None:
                    return (*claimed, True)
            got = self._r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=1,
                                     block=max(1, int(timeout * 1000)))
            return (*got[0][1][0], False) if got and got[0][1] else None

        got = self._retrying(read)
        if got is None:
            return None
        return self._message(*got)

    def _claim(self):
        """One message another consumer has left pending for ``claim_idle`` s, now ours (XAUTOCLAIM), or
        None. Entries deleted meanwhile come back without fields: they are acknowledged and skipped."""
        self._last_claim = time.monotonic()
        while True:
            reply = self._r.xautoclaim(self.stream, self.group, self.consumer, int(self.claim_idle * 1000),
                                       start_id=self._claim_cursor, count=1)
            cursor, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                self._r.xack(self.stream, self.group, *deleted)
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
            for entry, fields in entries:
                if fields:
                    return entry, fields
                self._r.xack(self.stream, self.group, entry)
            if self._claim_cursor in ("0-0", "0"):
                return None

    def is_done(self, msg: Message) -> bool:
        """Whether a result for this message's id is already stored (a repeat: acknowledge, do not redo)."""
        return bool(self._retrying(lambda: self._r.hexists(self.results_key, msg.id)))

    def complete(self, msg: Message, record: dict | None) -> None:
        """Store ``record`` as the result of ``msg.id`` unless one is stored already, count the delivery,
        acknowledge and delete the message: one MULTI, so a crash leaves either all of it or none."""
        def do():
            pipe = self._r.pipeline(transaction=True)
            if record is not None:
                pipe.hsetnx(self.results_key, msg.id, json.dumps(record))
            pipe.hincrby(self.deliveries_key, msg.id, 1)
            pipe.xack(self.stream, self.group, msg.entry)
            pipe.xdel(self.stream, msg.entry)
            pipe.execute()

        self._retrying(do)

    def ack(self, msg: Message) -> None:
        def do():
            pipe = self._r.pipeline()
            pipe.xack(self.stream, self.group, msg.entry)
            pipe.xdel(self.stream, msg.entry)
            pipe.execute()

        self._retrying(do)

    def collect(self, ids, timeout: float = 300.0, poll: float = 0.02) -> dict[str, dict]:
        """The stored result of every id in ``ids``, waiting until all of them exist (the set, not a
        count: a repeat cannot end the wait early)."""
        want = sorted(set(ids))
        deadline = time.monotonic() + timeout
        while True:
            have = self._retrying(lambda: self._r.hlen(self.results_key))
            if have >= len(want):
                values = self._retrying(lambda: self._r.hmget(self.results_key, want))
                if all(v is not None for v in values):
                    return {k: json.loads(v) for k, v in zip(want, values)}
            if time.monotonic() > deadline:
                done = sum(v is not None for v in self._retrying(lambda: self._r.hmget(self.results_key, want)))
                raise RuntimeError(f"timed out with {done} of {len(want)} results")
            time.sleep(poll)

    def deliveries(self) -> dict[str, int]:
        """How many times each id was completed (1 = exactly once; more = re-delivered and skipped)."""
        raw = self._retrying(lambda: self._r.hgetall(self.deliveries_key))
        return {k.decode(): int(v) for k, v in raw.items()}

    def pending(self) -> int:
        return int(self._retrying(lambda: self._r.xpending(self.stream, self.group))["pending"])

    def stream_length(self) -> int:
        return int(self._retrying(lambda: self._r.xlen(self.stream)))

    def close(self):
        if self._r is not None:
            self._r.close()


def make_broker(kind: str, redis_url: str | None = None, **redis_options):
    if kind == "queue":
        return QueueBroker()
    if kind == "shm":
        return ShmBroker()
    if kind == "redis":
        if not redis_url:
            raise ValueError("the redis broker needs redis_url (start one with RedisServer)")
        return RedisBroker(redis_url, stream=f"crops-{uuid.uuid4().hex[:8]}", **redis_options)
    raise ValueError(f"unknown broker {kind!r}; expected queue, shm or redis")


# ------------------------------------------------------------------------------------------ the consumer
def run_consumer(broker, make_handler: Callable, stop, ready=None, **handler_args) -> None:
    """A pipeline stage: take messages from ``broker`` until ``stop`` is set, run the handler that
    ``make_handler(**handler_args)`` builds (in this process: a model loads here) on each, and ``complete``
    it with ``{**meta, "id", "c0" (asked), "c1" (has the array), **handler(msg)}``. A message whose id
    already has a result is acknowledged without running the handler again."""
    broker = broker.connect()
    handle = make_handler(**handler_args)
    if ready is not None:
        ready.put("ready")
    while not stop.is_set():
        c0 = now()
        msg = broker.get(timeout=0.2)
        if msg is None:
            continue
        c1 = now()
        if broker.is_done(msg):
            broker.complete(msg, None)
            continue
        broker.complete(msg, {**msg.meta, "id": msg.id, "c0": c0, "c1": c1, "redelivered": msg.redelivered,
                              **handle(msg)})


def digest_handler(work: float = 0.0):
    """A stand-in stage without a model: the SHA-256 of the array it received (to check delivery), after
    ``work`` seconds of pretend work (so that a consumer killed at a random moment likely holds a message)."""
    def handle(msg):
        if work:
            time.sleep(work)
        return {"digest": hashlib.sha256(np.ascontiguousarray(msg.array).tobytes()).hexdigest()}

    return handle


def classifier_handler(threads: int = 1, device: str = "cpu"):
    """Stage 2 of the pipeline: MobileNetV2 on the crop (on ``device``); ``classified`` stamps when it finished
    (``int`` of the label waits for the GPU)."""
    import torch

    from . import preprocess as pp
    from .models import build

    torch.set_num_threads(threads)
    net, spec = build("mobilenet_v2")
    net.to(device)
    with torch.inference_mode():
        net(torch.zeros(1, 3, *spec.input_size, device=device))

    def handle(msg):
        x = torch.from_numpy(np.array(msg.array)).permute(2, 0, 1).to(device)
        x = pp.normalize(x, spec.mean, spec.std)
        with torch.inference_mode():
            label = int(net(x[None])[0].argmax())
        return {"classified": now(), "label": label}

    return handle


# ----------------------------------------------------------------------------------------- the pipeline
def _crops(img, boxes, k: int, size=(224, 224)):
    """``k`` crops from the full-resolution decoded photo at the detector's boxes, resized to ``size``."""
    from PIL import Image

    w, h = img.size
    out = []
    for box in boxes[:k]:
        x1, y1, x2, y2 = box
        x1, y1 = min(max(0, int(x1)), w - 16), min(max(0, int(y1)), h - 16)
        x2, y2 = max(x1 + 16, min(w, int(x2))), max(y1 + 16, min(h, int(y2)))
        out.append(np.asarray(img.crop((x1, y1, x2, y2)).resize((size[1], size[0]), Image.BILINEAR)))
    return out


def run_pipeline(kind: str, images: list[bytes], *, crops: int = 4, rate: float = 1.0, redis_url: str | None = None,
                 timeout: float = 300.0, device: str = "cpu") -> list[dict]:
    """Detector (this process) -> broker -> classifier (a thread for ``queue``, a spawned process for
    ``shm`` and ``redis``), images arriving at ``rate`` per second, both DNNs on ``device`` (the photo is
    decoded and the crops cut on the host either way). One record per crop, with stamps:
    start (image taken), p0 (crop ready), p1 (put returned), c0 (consumer asked), c1 (consumer has the
    array), classified. Every crop gets an id (``image:crop``); the run ends when every accepted id has
    its result."""
    import torch

    from . import preprocess as pp
    from .models import build
    from .server import detect

    if crops < 1 or rate <= 0 or not images:
        raise ValueError("need images, crops >= 1 and rate > 0")
    broker = make_broker(kind, redis_url)
    if kind == "queue":
        out, ready, stop = None, queue.Queue(), threading.Event()
        worker = threading.Thread(target=run_consumer, args=(broker, classifier_handler, stop, ready),
                                  kwargs={"device": device}, daemon=True)
    else:
        ctx = get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        worker = ctx.Process(target=run_consumer, args=(broker, classifier_handler, stop, ready),
                             kwargs={"device": device}, daemon=True)
    worker.start()
    try:
        ready.get(timeout=120)
        producer = broker.connect() if kind == "redis" else broker
        net, spec = build("detection")
        net.to(device)
        anchors = net.anchors(spec.input_size).to(device)
        with torch.inference_mode():
            net(torch.zeros(1, 3, *spec.input_size, device=device))
        put_times = {}
        t_next = now()
        for i, data in enumerate(images):
            t_next += 1.0 / rate
            start = now()
            img = pp.decode(data, "pil")
            x = pp.normalize(pp.to_uint8_chw(pp.resize(img, spec.input_size)).to(device), spec.mean, spec.std)
            with torch.inference_mode():
                deltas, logits = net(x[None])
            dets = detect(deltas[0], logits[0], anchors, img.size, score_threshold=0.0, max_out=crops)
            for j, crop in enumerate(_crops(img, [d["box"] for d in dets], crops)):
                p0 = now()
                mid = producer.put(crop, {"image": i, "crop": j, "start": start, "p0": p0}, mid=f"{i}:{j}")
                put_times[mid] = now()  # accepted: the broker holds it
            delay = t_next - now()
            if delay > 0:
                time.sleep(delay)
        results = broker.collect(put_times, timeout=timeout)
    finally:
        stop.set()
        worker.join(timeout=10)
        if kind != "queue" and worker.is_alive():
            worker.terminate()
        if kind == "shm":
            broker.close()
    records = []
    for mid, rec in results.items():
        records.append({**rec, "p1": put_times[mid], "broker": kind})
    return sorted(records, key=lambda r: (r["image"], r["crop"]))


# ------------------------------------------------------------------------------------ durability cost
def filesystem_of(path: str) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts): an fsync on tmpfs costs nothing, so a
    durability measurement must say where its append-only file was."""
    path, best, fs = os.path.realpath(path), "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                _, mnt, typ = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, typ
    except OSError:
        pass
    return fs


def durability_cost(settings=APPENDFSYNC, *, messages: int = 300, shape=(224, 224, 3), rounds: int = 3,
                    workdir: str | None = None) -> list[dict]:
    """What each ``appendfsync`` setting costs a message: one redis-server per setting (append-only file in
    a fresh folder under ``workdir``, default the system temp folder: put it on the disk under test), all
    up at once; then ``rounds`` rounds, settings interleaved, in which one client puts ``messages`` crops of
    ``shape`` and gets and completes each (XADD; XREADGROUP; MULTI of HSETNX/HINCRBY/XACK/XDEL) one after
    another. Per setting and round: median and p99 latency (µs) of put, get and complete, and of the whole
    message."""
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    rows = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for setting in settings:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"effllm-aof-{setting}-", dir=workdir))
            servers[setting] = stack.enter_context(RedisServer(workdir=folder, appendfsync=setting))
        for r in range(rounds):
            for setting, rs in servers.items():
                br = RedisBroker(rs.url, stream=f"durability-{r}").connect()
                lat = {"put": [], "get": [], "complete": []}
                for i in range(messages):
                    t0 = time.perf_counter()
                    br.put(arr, {"i": i}, mid=str(i))
                    t1 = time.perf_counter()
                    msg = br.get(timeout=5)
                    t2 = time.perf_counter()
                    br.complete(msg, {"i": i})
                    t3 = time.perf_counter()
                    lat["put"].append(t1 - t0)
                    lat["get"].append(t2 - t1)
                    lat["complete"].append(t3 - t2)
                row = {"appendfsync": setting, "round": r, "messages": messages, "message_bytes": arr.nbytes,
                       "filesystem": filesystem_of(rs.workdir)}
                total = np.add(np.add(lat["put"], lat["get"]), lat["complete"])
                for k, v in {**lat, "message": total}.items():
                    row[f"{k}_p50_us"] = float(np.median(v) * 1e6)
                    row[f"{k}_p99_us"] = float(np.percentile(v, 99) * 1e6)
                rows.append(row)
                br._r.delete(br.stream, br.results_key, br.deliveries_key)
                br.close()
    return rows


def pipeline_frame(records: list[dict]) -> pd.DataFrame:
    """Per-crop spans (ms) that add up to ``total_ms`` (image taken -> crop classified):

    ``detector_ms`` (decode, detect, crop) + ``queue_ms`` + ``broker_ms`` + ``classifier_ms``, where the
    hand-off p0 -> c1 is split into ``queue_ms`` = max(0, c0 - p1), the time the message was already
    stored but the classifier was still busy, and ``broker_ms``, the rest: serialization, transfer,
    storage and deserialization on the critical path. ``send_ms`` = p1 - p0 is the producer's own cost
    of a put (part of ``broker_ms``)."""
    import pandas as pd

    rows = []
    for r in records:
        handoff = r["c1"] - r["p0"]
        wait = max(0.0, r["c0"] - r["p1"])
        rows.append({"broker": r["broker"], "image": r["image"], "crop": r["crop"],
                     "detector_ms": (r["p0"] - r["start"]) * 1e3, "queue_ms": wait * 1e3,
                     "broker_ms": (handoff - wait) * 1e3, "send_ms": (r["p1"] - r["p0"]) * 1e3,
                     "classifier_ms": (r["classified"] - r["c1"]) * 1e3,
                     "total_ms": (r["classified"] - r["start"]) * 1e3})
    return pd.DataFrame(rows)


def broker_share(df: pd.DataFrame) -> pd.DataFrame:
    """Per broker: median of each span (ms) and the broker's share of the crops' end-to-end latency (%),
    as the median over crops of broker_ms / total_ms."""
    g = df.assign(share=100 * df["broker_ms"] / df["total_ms"]).groupby("broker")
    out = g[["detector_ms", "queue_ms", "broker_ms", "send_ms", "classifier_ms", "total_ms"]].median()
    out["broker_share"] = g["share"].median()
    out["crops"] = g.size()
    return out.reset_index()
