"""What the gateway needs from the queue and the store, as two small protocols.

Routes talk only to ``Queue`` and ``FeatureStore``; ``butd.service.adapters.RedisQueue``
implements the first over ``butd.workers.queue`` (Redis Streams), the store's front door
``butd.store.shard_store.StoreReader`` the second (sealed HDF5 shards + the Redis index), and
unit tests substitute in-memory fakes. Every method is synchronous (redis-py, h5py); routes
call the slow ones from a worker thread.

Shapes: N regions of one image, D feature size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from butd.store.records import StoredRecord
from butd.workers.heads_protocol import HeadsRequest, HeadsResult
from butd.workers.options import ExtractOptions
from butd.workers.protocol import (
    Heartbeat,
    JobItem,
    JobStatus,
    OnlineRequest,
    OnlineResult,
)
from butd.workers.wire import ModelMeta


@dataclass(frozen=True)
class RequestClaim:
    """An ``Idempotency-Key`` already taken: the request it was first used with and, once that
    request succeeded, its answer (a JSON body)."""

    fingerprint: str
    answer: str | None = None


class Queue(Protocol):
    """The Redis side: online requests, batch jobs, worker heartbeats."""

    def ping(self) -> bool:
        """True when Redis answers."""
        ...

    def live_workers(self) -> list[Heartbeat]:
        """Heartbeats younger than the configured maximum age."""
        ...

    def queue_depth(self) -> int:
        """Online requests waiting or being computed."""
        ...

    def pending_count(self) -> int:
        """Stream entries delivered to a worker and not yet acknowledged (all streams)."""
        ...

    def enqueue_online(self, request: OnlineRequest, data: bytes, *, max_depth: int) -> int | None:
        """Queue one image for extraction now, unless ``max_depth`` online requests are waiting
        or in progress (checked atomically with the enqueue).

        Returns:
            None when queued, else the depth that refused it.
        """
        ...

    def wait_result(self, request_id: str, timeout_s: float) -> OnlineResult | None:
        """Block until the worker answers ``request_id``; None after ``timeout_s``.

        A computed answer carries its ``record`` (stored form), sent before it is sealed.
        """
        ...

    def enqueue_heads(self, request: HeadsRequest, *, max_depth: int) -> int | None:
        """Queue one caption / VQA request unless ``max_depth`` are waiting or in progress.

        Returns:
            None when queued, else the depth that refused it.
        """
        ...

    def wait_heads(self, request_id: str, timeout_s: float) -> HeadsResult | None:
        """Block until a worker answers the heads request; None after ``timeout_s``."""
        ...

    def model_meta(self, model_version: str) -> ModelMeta | None:
        """The vocabularies and description a worker published for ``model_version``."""
        ...

    def create_job(
        self, job_id: str, items: Sequence[JobItem], *, namespace: str, options: ExtractOptions
    ) -> JobStatus:
        """Queue a batch job in shards (an existing ``job_id`` is returned unchanged)."""
        ...

    def job_status(self, job_id: str) -> JobStatus | None:
        """Progress of a job; None when unknown."""
        ...

    def claim_request(self, job_id: str, fingerprint: str) -> RequestClaim | None:
        """Take ``job_id`` for the request hashing to ``fingerprint`` (atomic, first wins).

        Returns:
            None when this call took it; else the claim in force (its fingerprint and answer).
        """
        ...

    def save_answer(self, job_id: str, answer: str) -> None:
        """Keep the answer of the request that claimed ``job_id`` (replayed to its repeats)."""
        ...

    def release_request(self, job_id: str) -> None:
        """Drop the claim of a request that failed, so the key may be used again."""
        ...

    def cancel_job(self, job_id: str) -> str | None:
        """Cancel a job; returns its state afterwards, None when unknown."""
        ...


class FeatureStore(Protocol):
    """The feature cache: (model_version, sha256) -> record, (namespace, image_id) -> sha256."""

    def get(self, model_version: str, sha256: str) -> StoredRecord | None:
        """The cached record, or None."""
        ...

    def resolve(self, namespace: str, image_id: str) -> str | None:
        """The content hash an image id is an alias of, or None."""
        ...

    def add_alias(self, namespace: str, image_id: str, sha256: str) -> None:
        """Record that (namespace, image_id) names the content ``sha256`` (idempotent)."""
        ...

    def remember(
        self, model_version: str, stored: StoredRecord, alias: tuple[str, str] | None = None
    ) -> None:
        """Keep a record a worker answered with (and is sealing), bound to ``alias``
        ((namespace, image_id) or None), for reads that come before the seal."""
        ...

    def export(
        self, model_version: str, namespace: str, image_ids: Sequence[str], fmt: str, out: Path
    ) -> int:
        """Write the cached records of ``image_ids`` in format ``fmt`` to ``out``.

        Returns:
            The number of records written (ids with no cached record are left out).

        Raises:
            butd.store.shard_store.NothingStoredError: none of the ids has a record (404).
            butd.store.shard_store.ExportRefusedError: the format cannot hold them (422).
        """
        ...
