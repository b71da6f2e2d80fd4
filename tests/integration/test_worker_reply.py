"""Reply before seal: an in-process worker (tiny model, CPU) on a private redis-server.

The worker answers an online request with its record, then seals, indexes and acks it. These
tests stop it right after the answer (the ``Replies.after_answer`` fault point raises
``Killed``, a BaseException nothing in the worker catches, as a SIGKILL would end it) and
check that the entry stays pending, is redelivered, and the image ends up stored exactly once,
equal to what was answered.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from butd.store.index import FeatureIndex
from butd.store.shard_store import StoreWriter
from butd.store.shards import ShardReaders
from butd.workers import queue as q
from butd.workers.protocol import ONLINE_STREAM, OnlineRequest
from butd.workers.settings import WorkerSettings
from butd.workers.wire import ModelMeta
from butd.workers.worker import Worker
from tests.integration.test_worker_e2e import (  # noqa: F401  (fixture used by name)
    FAST_EXTRACTION,
    assert_same_record,
    client,
    image_bytes,
    stored_rows,
    tiny_weights,
)


class Killed(BaseException):
    """Ends the worker where it is, like a SIGKILL (nothing catches a BaseException)."""


def kill() -> None:
    raise Killed


@pytest.fixture(scope="module")
def extractor(tiny_weights: Path) -> Any:  # noqa: F811
    from butd.detector.extractor import Extractor

    return Extractor.from_weights(tiny_weights, device="cpu", **FAST_EXTRACTION)


def make_worker(
    r: redis.Redis, url: str, store: Path, name: str, extractor: Any, claim_idle_ms: int
) -> Worker:
    settings = WorkerSettings(
        _env_file=None,
        redis_url=url,
        store_dir=store,
        worker_id=name,
        batch_wait_ms=0,
        idle_block_ms=200,
        claim_idle_ms=claim_idle_ms,
        janitor_interval_s=0.05,
    )
    spec = extractor.spec
    sink = StoreWriter(
        store,
        FeatureIndex(r),
        writer_id=name,
        meta={
            "objects_vocab": spec.objects_vocab,
            "attributes_vocab": spec.attributes_vocab,
            "feature_dim": spec.arch.feature_dim,
        },
    )
    meta = ModelMeta(tuple(spec.objects_vocab), tuple(spec.attributes_vocab), spec.description)
    return Worker(settings, extractor, sink, client=r, model_meta=meta)


def enqueue(r: redis.Redis, request_id: str, data: bytes) -> OnlineRequest:
    sha = hashlib.sha256(data).hexdigest()
    deadline = int(time.time() * 1000) + 60_000
    return q.enqueue_online(
        r, OnlineRequest(request_id, sha, "ns", request_id, deadline_ms=deadline), data
    )


def stored_record(r: redis.Redis, store: Path, version: str, sha: str) -> Any:
    location = FeatureIndex(r).lookup_content(version, sha)
    assert location is not None, "not indexed"
    readers = ShardReaders(store / "shards")
    try:
        return readers.get(location)
    finally:
        readers.close()


def test_the_answer_comes_before_the_seal_and_equals_the_stored_record(
    redis_url: str, tmp_path: Path, extractor: Any
) -> None:
    r = client(redis_url)
    store = tmp_path / "store"
    worker = make_worker(r, redis_url, store, "w1", extractor, 60_000)
    answered: list[Any] = []
    worker.replies.after_answer = lambda: answered.append(
        (stored_rows(store), q.pending_count(r)[ONLINE_STREAM])
    )
    req = enqueue(r, "a", image_bytes(21))
    try:
        worker.step()
        assert worker.sealer.drain(30)
    finally:
        worker.sealer.close()
    assert answered == [({}, 1)]  # at the answer: nothing sealed, the entry still pending
    res = q.wait_result(r, "a", 5)
    assert res is not None and res.status == "ok" and res.record is not None
    assert set(res.timings) == {"t_batch", "t_extracted", "t_replied"}
    assert stored_rows(store) == {(res.model_version, req.content_sha256): 1}
    assert_same_record(res.record, stored_record(r, store, res.model_version, req.content_sha256))
    assert q.pending_count(r)[ONLINE_STREAM] == 0 and r.exists(req.image_key) == 0
    assert FeatureIndex(r).lookup_alias("ns", "a") == req.content_sha256
    assert ModelMeta.from_json(r.get(f"butd:model:{res.model_version}") or b"").objects_vocab


@pytest.mark.parametrize("successor", ["w1", "w2"], ids=["restarted", "another-worker"])
def test_a_worker_killed_after_answering_leaves_the_entry_to_be_redelivered_and_stored_once(
    redis_url: str, tmp_path: Path, extractor: Any, successor: str
) -> None:
    r = client(redis_url)
    store = tmp_path / "store"
    doomed = make_worker(r, redis_url, store, "w1", extractor, 60_000)
    doomed.replies.after_answer = kill
    req = enqueue(r, "a", image_bytes(22))
    try:
        with pytest.raises(Killed):
            doomed.step()
    finally:
        doomed.sealer.close()
    first = q.wait_result(r, "a", 5)
    assert first is not None and first.status == "ok" and first.record is not None
    assert stored_rows(store) == {}  # answered, never sealed
    assert q.pending_count(r)[ONLINE_STREAM] == 1 and r.exists(req.image_key) == 1

    time.sleep(0.15)  # past the heir's claim_idle_ms: another worker's janitor reclaims it
    # (restarted, it re-reads its own pending entries; its janitor must not take it again)
    claim_idle_ms = 100 if successor == "w2" else 60_000
    heir = make_worker(r, redis_url, store, successor, extractor, claim_idle_ms)
    try:
        heir.step()  # "w1" re-reads its own pending entry; "w2" reclaims it
        assert heir.sealer.drain(30)
    finally:
        heir.sealer.close()
    version, sha = first.model_version, req.content_sha256
    assert stored_rows(store) == {(version, sha): 1}  # stored exactly once
    assert q.pending_count(r)[ONLINE_STREAM] == 0 and q.dlq_length(r) == 0
    assert r.exists(req.image_key) == 0  # the upload is released after the ack
    assert_same_record(first.record, stored_record(r, store, version, sha))
    again = q.wait_result(r, "a", 5)  # the redelivered entry is answered again (same record)
    assert again is not None and again.record is not None
    assert_same_record(again.record, first.record)
