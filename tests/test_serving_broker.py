"""Brokers between two DNNs: byte-exact delivery, acknowledged delivery across a Redis crash, exactly-once
results through repeated kills of Redis and of consumers, and a two-DNN pipeline whose classifier answers
must not depend on the broker. The tests start and stop their own redis-server on a free loopback port."""

import hashlib
import threading
import time
from multiprocessing import get_context

import numpy as np
import pytest

from effllm_lib.serving import broker as B
from effllm_lib.serving.images import synthetic_jpeg

needs_redis = pytest.mark.skipif(not B.redis_available(),
                                 reason="redis-server is not installed (apt-get install redis-server; see apt.txt)")


@pytest.fixture(scope="module")
def redis_server():
    with B.RedisServer() as rs:
        yield rs


@needs_redis
def test_redis_roundtrip_is_byte_exact_and_acked(redis_server):
    br = B.RedisBroker(redis_server.url, stream="t-roundtrip").connect()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8), rng.random((3, 5)).astype(np.float32)]
    for i, a in enumerate(arrays):
        br.put(a, {"i": i})
    for i, a in enumerate(arrays):
        msg = br.get(timeout=1)
        assert msg.meta == {"i": i} and msg.array.dtype == a.dtype and np.array_equal(msg.array, a)
        br.ack(msg)
    assert br.get(timeout=0.05) is None
    assert br.pending() == 0


@needs_redis
def test_unacked_message_is_redelivered_to_a_restarted_consumer(redis_server):
    first = B.RedisBroker(redis_server.url, stream="t-redeliver").connect()
    first.put(np.arange(4, dtype=np.int32), {"k": 1})
    msg = first.get(timeout=1)  # delivered, then the consumer "crashes" before ack
    again = B.RedisBroker(redis_server.url, stream="t-redeliver").connect()  # same group and consumer name
    msg2 = again.get(timeout=1)
    assert msg2.id == msg.id and np.array_equal(msg2.array, np.arange(4))
    again.ack(msg2)
    assert again.pending() == 0


@needs_redis
def test_broker_crash_loses_no_accepted_message():
    """SIGKILL redis-server mid-run and restart it: every message whose put() returned is delivered."""
    with B.RedisServer() as rs:
        producer = B.RedisBroker(rs.url, stream="t-crash").connect()
        consumer = B.RedisBroker(rs.url, stream="t-crash").connect()
        accepted, received, stop = [], [], threading.Event()

        def produce():
            for i in range(120):
                producer.put(np.full(64, i, dtype=np.uint8), {"uid": i})
                accepted.append(i)  # only after Redis acknowledged the XADD
                time.sleep(0.002)

        def consume():
            while not stop.is_set():
                msg = consumer.get(timeout=0.1)
                if msg is not None:
                    assert (msg.array == msg.meta["uid"]).all()
                    received.append(msg.meta["uid"])
                    consumer.ack(msg)

        threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
        for t in threads:
            t.start()
        while len(accepted) < 40:
            time.sleep(0.005)
        rs.restart(hard=True)  # SIGKILL: only what was fsynced to the append-only file survives
        threads[0].join(timeout=60)
        deadline = time.monotonic() + 20
        while not set(accepted) <= set(received) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        threads[1].join(timeout=10)
        assert len(accepted) == 120
        assert set(accepted) <= set(received), sorted(set(accepted) - set(received))[:10]
        assert consumer.pending() == 0


def test_shm_broker_roundtrip_and_slot_reuse():
    br = B.ShmBroker(slots=2, slot_bytes=1000)
    try:
        for i in range(5):  # more messages than slots: acks free them
            a = np.arange(i, i + 250, dtype=np.int32)
            br.put(a, {"i": i})
            msg = br.get(timeout=1)
            assert np.array_equal(msg.array, a) and msg.meta == {"i": i}
            br.ack(msg)
        with pytest.raises(ValueError, match="slot size"):
            br.put(np.zeros(1001, np.uint8), {})
    finally:
        br.close()


def test_unknown_broker_is_an_error():
    with pytest.raises(ValueError, match="unknown broker"):
        B.make_broker("kafka")


@needs_redis
def test_pipeline_answers_do_not_depend_on_the_broker(redis_server):
    imgs = [synthetic_jpeg(640, 360, seed=s) for s in range(2)]
    labels = {}
    for kind in ("queue", "redis"):
        recs = B.run_pipeline(kind, imgs, crops=2, rate=20, redis_url=redis_server.url, timeout=120)
        df = B.pipeline_frame(recs)
        spans = df[["detector_ms", "queue_ms", "broker_ms", "classifier_ms"]]
        assert len(df) == 4 and (spans >= 0).all().all()
        assert np.allclose(spans.sum(axis=1), df["total_ms"])
        labels[kind] = {(r["image"], r["crop"]): r["label"] for r in recs}
    assert labels["queue"] == labels["redis"]


@needs_redis
def test_repeats_are_recognised_by_id_and_stored_once(redis_server):
    """A producer retry that stored a message twice, and a re-delivery after a lost ack: one result each."""
    br = B.RedisBroker(redis_server.url, stream="t-repeat").connect()
    for mid in ("a", "a", "b"):  # "a" twice, as a retried XADD whose first reply was lost
        br.put(np.full(8, ord(mid[0]), np.uint8), {}, mid=mid)
    seen = []
    while (msg := br.get(timeout=0.2)) is not None:
        if br.is_done(msg):
            br.complete(msg, None)
            continue
        seen.append(msg.id)
        br.complete(msg, {"id": msg.id, "sum": int(msg.array.sum())})
    assert seen == ["a", "b"]
    assert br.collect(["a", "b"], timeout=5) == {"a": {"id": "a", "sum": 8 * 97}, "b": {"id": "b", "sum": 8 * 98}}
    assert br.deliveries() == {"a": 2, "b": 1} and br.pending() == 0 and br.stream_length() == 0


@needs_redis
def test_a_dead_consumers_pending_message_is_reclaimed(redis_server):
    dead = B.RedisBroker(redis_server.url, stream="t-claim", consumer="dead", claim_idle=0.3).connect()
    dead.put(np.arange(5, dtype=np.int16), {}, mid="m1")
    assert dead.get(timeout=1).id == "m1"  # delivered to "dead", which never acknowledges
    alive = dead.with_consumer("alive").connect()
    assert alive.get(timeout=0.1) is None  # not idle long enough yet: the owner may still be working
    time.sleep(0.4)
    msg = alive.get(timeout=1)
    assert msg is not None and msg.id == "m1" and np.array_equal(msg.array, np.arange(5))
    alive.complete(msg, {"id": "m1"})
    assert alive.pending() == 0


N_CHAOS = 200


def _payload(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, 3000, dtype=np.uint8)


@needs_redis
def test_kills_and_restarts_of_redis_and_consumers_lose_and_repeat_nothing():
    """Produce N_CHAOS messages while, three times over, a consumer process is SIGKILLed and replaced by a new one
    (another name: its predecessor's pending message must be reclaimed) and redis-server is SIGKILLed and
    restarted. The results must hold every accepted id exactly once, each with the digest of the very array
    the producer sent (computed here, independently)."""
    ctx = get_context("spawn")
    rng = np.random.default_rng(0)
    with B.RedisServer(appendfsync="always") as rs:
        base = B.RedisBroker(rs.url, stream="t-chaos", claim_idle=0.5, retry_for=60)
        producer = base.with_consumer("producer").connect()
        accepted, stop, ready = [], ctx.Event(), ctx.Queue()

        def start_consumer(k):
            proc = ctx.Process(target=B.run_consumer, args=(base.with_consumer(f"c{k}"), B.digest_handler, stop,
                                                            ready), kwargs={"work": 0.01}, daemon=True)
            proc.start()
            return proc

        def produce():
            for i in range(N_CHAOS):
                mid = producer.put(_payload(i), {"i": i}, mid=f"m{i}")
                accepted.append(mid)  # only once Redis acknowledged the XADD
                time.sleep(0.01)

        consumers = [start_consumer(0), start_consumer(1)]
        for _ in consumers:
            ready.get(timeout=60)
        t0 = time.monotonic()
        feeder = threading.Thread(target=produce)
        feeder.start()
        try:
            for k in range(3):
                time.sleep(rng.uniform(0.3, 0.8))
                victim = consumers.pop(0)
                victim.kill()  # SIGKILL: whatever it held is pending under its name
                victim.join(timeout=10)
                consumers.append(start_consumer(2 + k))
                time.sleep(rng.uniform(0.2, 0.6))
                rs.restart(hard=True)  # SIGKILL: only what was fsynced survives
            t1 = time.monotonic()
            feeder.join(timeout=120)
            assert not feeder.is_alive() and len(accepted) == N_CHAOS
            t2 = time.monotonic()
            results = producer.collect(accepted, timeout=60)
            print(f"chaos {t1 - t0:.1f} s, production done +{t2 - t1:.1f} s, results +{time.monotonic() - t2:.1f} s")
        finally:
            stop.set()
            for proc in consumers:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        assert sorted(results) == sorted(accepted)
        for mid, rec in results.items():
            i = int(mid[1:])
            assert rec["i"] == i and rec["digest"] == hashlib.sha256(_payload(i).tobytes()).hexdigest(), mid
        deliveries = producer.deliveries()
        assert set(deliveries) == set(accepted) and min(deliveries.values()) >= 1
        print(f"{sum(r['redelivered'] for r in results.values())} results from re-delivered or reclaimed messages, "
              f"{sum(deliveries.values()) - len(deliveries)} repeats recognised")
        assert producer.pending() == 0 and producer.stream_length() == 0
