"""Forming GPU batches from queue entries, and loading each image on its own (torch-free).

* ``fill_batch`` tops up a first read of online entries with those already queued, and while
  they keep coming until ``max_items`` or ``max_wait_ms`` after the first arrived (the two
  knobs every model server has); a lone request goes at once.
* ``Task`` is one image to process, from an online entry or one item of a job shard;
  ``tasks_from_online`` / ``tasks_from_shard`` build them.
* ``load_task`` reads, hashes and decodes one image; any failure becomes that task's reason,
  never an exception that would fail the batch it shares (STYLE.md §12).
* ``group_by_options`` splits a batch by per-request extraction overrides (one
  ``ExtractionConfig`` per model call).
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from butd.detector.config import ExtractionConfig
from butd.images import ImageError, decode_image
from butd.store import ids
from butd.store.objects import is_url, read_url
from butd.store.records import FeatureRecord, StoredRow
from butd.store.shards import Alias
from butd.workers.files import DEFAULT_LIMITS, ReadLimits, read_file, read_member
from butd.workers.isolate import put_isolated
from butd.workers.protocol import ExtractOptions, JobShard, OnlineRequest, ProtocolError
from butd.workers.queue import Entry

log = logging.getLogger(__name__)

ARCHIVE_SEPARATOR = "::"

BGRImage = npt.NDArray[np.uint8]
ReadFn = Callable[[int, int], list[Entry]]
FetchFn = Callable[[str], bytes | None]
ComputedFn = Callable[[list["Outcome"]], None]


def fill_batch(
    first: Sequence[Entry],
    read: ReadFn,
    *,
    max_items: int,
    max_wait_ms: int,
    clock: Callable[[], float] = time.monotonic,
) -> list[Entry]:
    """Top up ``first`` with queued entries; wait for more only while a burst is arriving.

    The first top-up read does not block: when nothing more is queued the batch goes at once
    (waiting could only delay a lone request). When it finds entries (a burst, or a backlog
    behind a busy worker), blocking reads follow until ``max_items`` or ``max_wait_ms`` after
    the first arrival, whichever comes first.

    Args:
        first: entries already read (the batch's first arrivals); the wait starts now.
        read: ``read(count, block_ms)`` returns up to ``count`` new entries, waiting at most
            ``block_ms`` for the first of them (0: only those already queued).
        max_items: batch size cap (images).
        max_wait_ms: latency cap, milliseconds after the first arrival.

    Returns:
        ``first`` followed by whatever arrived in time, at most ``max_items`` entries.
    """
    batch = list(first)[:max_items]
    deadline = clock() + max_wait_ms / 1000.0
    block_ms = 0
    while len(batch) < max_items:
        got = read(max_items - len(batch), block_ms)
        if not got:
            break
        batch.extend(got[: max_items - len(batch)])
        block_ms = int((deadline - clock()) * 1000.0)
        if block_ms < 1:
            break
    return batch


@dataclass(frozen=True)
class Task:
    """One image to process.

    Attributes:
        entry: the stream entry it came from (one online entry, or a shard entry for K tasks).
        image_id: the caller's id of the image.
        namespace: the caller's id space.
        options: extraction overrides.
        source: where the bytes are: ``redis:KEY`` (uploaded), an absolute path,
            ``ARCHIVE::MEMBER`` or an object URL (``s3://bucket/key``).
        content_sha256: the hash the gateway computed ("" when unknown: job items).
        request_id: the online request ("" for job items).
        deadline_ms: epoch ms after which an online task is dropped (0 = none).
    """

    entry: Entry
    image_id: str
    namespace: str
    options: ExtractOptions
    source: str
    content_sha256: str = ""
    request_id: str = ""
    deadline_ms: int = 0

    def expired(self, now_ms: int) -> bool:
        return self.deadline_ms > 0 and now_ms > self.deadline_ms


def tasks_from_online(entry: Entry) -> Task:
    """The task of an online entry (raises ``ProtocolError`` on a malformed entry)."""
    req = OnlineRequest.from_fields(entry.fields or {})
    if not (req.image_key or req.path):
        raise ProtocolError(f"online request {req.request_id} has neither image_key nor path")
    return Task(
        entry=entry,
        image_id=req.image_id or req.request_id,
        namespace=req.namespace,
        options=req.options,
        source=f"redis:{req.image_key}" if req.image_key else req.path,
        content_sha256=req.content_sha256,
        request_id=req.request_id,
        deadline_ms=req.deadline_ms,
    )


def tasks_from_shard(entry: Entry) -> tuple[JobShard, list[Task]]:
    """The shard of a job entry and one task per item."""
    shard = JobShard.from_fields(entry.fields or {})
    tasks = [
        Task(entry, item.image_id, shard.namespace, shard.options, item.ref) for item in shard.items
    ]
    return shard, tasks


@dataclass(frozen=True)
class Loaded:
    """A task after loading: its bytes hashed and decoded, or the reason it failed."""

    task: Task
    content_sha256: str = ""
    image: BGRImage | None = None
    reason: str = ""
    # The extractor's host-side preparation of ``image`` (``Extractor.stage``, done by a
    # loader thread of ``butd.workers.pipeline``), extracted in its place; None: not staged.
    staged: Any = None

    @property
    def ok(self) -> bool:
        return self.image is not None


def read_source(source: str, fetch: FetchFn, limits: ReadLimits = DEFAULT_LIMITS) -> bytes:
    """Bytes of a task's source: ``redis:KEY`` through ``fetch``, an fsspec URL
    (``s3://bucket/key``), a file, or an archive member.

    Files and members are read only when regular, within ``limits`` (``butd.workers.files``).

    Raises:
        FileNotFoundError, KeyError, OSError, ValueError: with a message naming the source.
    """
    if source.startswith("redis:"):
        data = fetch(source[len("redis:") :])
        if data is None:
            raise FileNotFoundError(f"uploaded bytes {source[6:]!r} are gone (TTL passed)")
        return data
    if is_url(source):  # s3://bucket/key or any fsspec URL (butd.store.objects)
        return read_url(source)
    if ARCHIVE_SEPARATOR in source:
        archive, member = source.split(ARCHIVE_SEPARATOR, 1)
        return read_member(Path(archive), member, limits)
    path = Path(source)
    if not path.is_absolute():
        raise ValueError(f"image path must be absolute; got {source!r}")
    return read_file(path, limits)


def load_task(
    task: Task, fetch: FetchFn, *, max_pixels: int, limits: ReadLimits = DEFAULT_LIMITS
) -> Loaded:
    """Read, hash and decode one task's image; a failure is returned as its reason.

    The pixel limit is checked on the header, before any pixel is decoded.
    """
    problem = ids.name_problem(task.namespace, task.image_id)
    if problem is not None:  # fails this item only, before it reaches a shared seal
        return Loaded(task, reason=problem)
    try:
        data = read_source(task.source, fetch, limits)
    except (OSError, KeyError, ValueError, tarfile.TarError, zipfile.BadZipFile) as exc:
        return Loaded(task, reason=f"cannot read {task.source!r}: {exc}")
    sha = hashlib.sha256(data).hexdigest()
    if task.content_sha256 and task.content_sha256 != sha:
        reason = f"content sha256 {sha} differs from the request's {task.content_sha256}"
        return Loaded(task, content_sha256=sha, reason=reason)
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        return Loaded(task, content_sha256=sha, reason=f"{type(exc).__name__}: {exc}")
    return Loaded(task, content_sha256=sha, image=image)


def group_by_options(tasks: Sequence[Any]) -> dict[ExtractOptions, list[int]]:
    """Indices of ``tasks`` (objects with ``.options`` or ``.task.options``) per options value."""
    groups: dict[ExtractOptions, list[int]] = {}
    for i, t in enumerate(tasks):
        options = t.options if isinstance(t, Task) else t.task.options
        groups.setdefault(options, []).append(i)
    return groups


def stored(sink: FeatureSink, model_version: str, sha256s: Sequence[str]) -> list[bool]:
    """``sink.has`` of each content: one round trip when the sink has ``has_many``."""
    many = getattr(sink, "has_many", None)
    if many is not None:
        return list(many(model_version, sha256s))
    return [sink.has(model_version, s) for s in sha256s]


def chunks(n: int, size: int) -> list[range]:
    """Index ranges [0, n) in consecutive pieces of at most ``size``."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# --- running a batch ----------------------------------------------------------------------


class ExtractorLike(Protocol):
    """What the worker needs of ``butd.detector.extractor.Extractor``."""

    config: ExtractionConfig

    def version_for(self, config: ExtractionConfig) -> str: ...

    def extract(
        self,
        images: Sequence[Any],  # BGRImage, or what the extractor's ``stage`` made of one
        image_ids: Sequence[str],
        config: ExtractionConfig | None = None,
    ) -> list[FeatureRecord]: ...


class FeatureSink(Protocol):
    """Where a ``Processor`` puts the records it computed: the store itself
    (``butd.store.shard_store.StoreWriter``), or a sink that stores them later on a thread of
    its own (the online ``butd.workers.sealer.Sealer``, the pipeline's ``DeferredSink``)."""

    def has(self, model_version: str, sha256: str) -> bool:
        """True when (model_version, sha256) is stored, or put here and waiting to be."""
        ...

    def put(
        self,
        name: str,
        rows: Sequence[StoredRow],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[Alias] = (),
    ) -> None:
        """Take a batch's new ``rows`` (made under ``config``) and every alias it resolved.

        On return ``has`` is True for each row's content, and the rows and aliases are either
        stored (sealed in a shard, then indexed: ``StoreWriter``) or queued to be stored
        before the entries they came from are acked (``Sealer``, ``DeferredSink``).

        Raises:
            ValueError, TypeError: a row or alias the store can never hold (a sink that stores
                at once; ``butd.workers.isolate`` then puts the others apart).
        """
        ...


@dataclass(frozen=True)
class Outcome:
    """The result of one task."""

    task: Task
    ok: bool
    content_sha256: str = ""
    model_version: str = ""
    num_boxes: int = 0
    cached: bool = False
    reason: str = ""
    record: FeatureRecord | None = None


class Processor:
    """Load, skip what is stored, extract, put in the sink: a batch of tasks to one outcome each.

    Args:
        extractor: the loaded model.
        sink: the feature store.
        fetch: reads an uploaded image's bytes from Redis by key (None when gone).
        max_pixels: largest image decoded, pixels.
        limits: how job files are read (regular files only, timeout, size cap).
    """

    def __init__(
        self,
        extractor: ExtractorLike,
        sink: FeatureSink,
        fetch: FetchFn,
        *,
        max_pixels: int,
        limits: ReadLimits = DEFAULT_LIMITS,
    ) -> None:
        self.extractor = extractor
        self.sink = sink
        self.fetch = fetch
        self.max_pixels = max_pixels
        self.limits = limits

    def run(
        self, tasks: Sequence[Task], name: str, on_computed: ComputedFn | None = None
    ) -> list[Outcome]:
        """Outcomes in task order; ``name`` names the batch's puts (e.g. the entry id).

        Args:
            on_computed: called with each options group's outcomes (computed ones carry their
                ``record``) after extraction and *before* the group is put in the sink: the
                online path answers there. An exception it raises propagates; nothing is put.
        """
        start = time.perf_counter()
        loaded = self.load(tasks)
        outcomes: dict[int, Outcome] = {}
        for options, idx in group_by_options(loaded).items():
            group = [loaded[i] for i in idx]
            done = self._run_group(group, options, name, on_computed)
            for i, outcome in zip(idx, done, strict=True):
                outcomes[i] = outcome
        result = [outcomes[i] for i in range(len(tasks))]
        log.info(
            "batch %s: %d images, %d computed, %d cached, %d failed in %.3fs",
            name,
            len(tasks),
            sum(o.ok and not o.cached for o in result),
            sum(o.cached for o in result),
            sum(not o.ok for o in result),
            time.perf_counter() - start,
        )
        return result

    def load(self, tasks: Sequence[Task]) -> list[Loaded]:
        """Read, hash and decode each task, one after another (``butd.workers.pipeline`` overrides
        it with a thread pool that has started on them ahead)."""
        return [
            load_task(t, self.fetch, max_pixels=self.max_pixels, limits=self.limits) for t in tasks
        ]

    def prefetch(self, tasks: Sequence[Task]) -> None:
        """Start loading ``tasks``, to be ``run`` next (nothing here: loads happen in ``run``)."""

    def config_for(self, options: ExtractOptions) -> ExtractionConfig:
        """The worker's config with the request's overrides (ValueError when inconsistent)."""
        return self.extractor.config.replace(**options.overrides())

    def _run_group(
        self,
        group: Sequence[Loaded],
        options: ExtractOptions,
        name: str,
        on_computed: ComputedFn | None,
    ) -> list[Outcome]:
        try:
            config = self.config_for(options)
        except ValueError as exc:
            return [Outcome(x.task, False, x.content_sha256, reason=str(exc)) for x in group]
        version = self.extractor.version_for(config)
        fresh = [x for x in group if x.ok]
        known = stored(self.sink, version, [x.content_sha256 for x in fresh])
        todo: dict[str, Loaded] = {}
        for x, is_stored in zip(fresh, known, strict=True):
            if not is_stored:
                todo.setdefault(x.content_sha256, x)
        computed = self._compute(list(todo.values()), config)
        new = [s for s in computed.values() if isinstance(s, StoredRow)]
        outcomes = [self._outcome(x, version, computed) for x in group]
        if on_computed is not None:
            on_computed(outcomes)
        aliases = [
            Alias(o.task.namespace, o.task.image_id, o.content_sha256) for o in outcomes if o.ok
        ]
        if new or aliases:
            lost = put_isolated(self.sink, f"{name}-{version}", new, version,
                                config.to_json(), aliases)  # fmt: skip
            outcomes = [lost.fail(o) for o in outcomes] if lost else outcomes
        return outcomes

    def _compute(self, todo: list[Loaded], config: ExtractionConfig) -> dict[str, StoredRow | str]:
        images = [x.staged if x.staged is not None else x.image for x in todo]
        shas = [x.content_sha256 for x in todo]
        results = self._extract(images, shas, config)
        return {
            x.content_sha256: (
                res
                if isinstance(res, str)
                else StoredRow(
                    replace(res, image_id=x.task.image_id), x.content_sha256, x.task.namespace
                )
            )
            for x, res in zip(todo, results, strict=True)
        }

    def _extract(
        self, images: list[Any], ids: list[str], config: ExtractionConfig
    ) -> list[FeatureRecord | str]:
        """Records in order; an image the model fails on alone gets a reason instead."""
        if not images:
            return []
        try:
            return list(self.extractor.extract(images, ids, config=config))
        except Exception as exc:  # isolate the image that breaks the model, keep the others
            if len(images) == 1:
                log.warning("extraction of %s failed: %r", ids[0], exc)
                return [f"extraction failed: {type(exc).__name__}: {exc}"]
        return [self._extract([im], [i], config)[0] for im, i in zip(images, ids, strict=True)]

    @staticmethod
    def _outcome(x: Loaded, version: str, computed: dict[str, StoredRow | str]) -> Outcome:
        sha = x.content_sha256
        if not x.ok:
            return Outcome(x.task, False, sha, reason=x.reason)
        res = computed.get(sha)
        if res is None:
            return Outcome(x.task, True, sha, version, cached=True)
        if isinstance(res, str):
            return Outcome(x.task, False, sha, reason=res)
        record = replace(res.record, image_id=x.task.image_id)
        return Outcome(x.task, True, sha, version, num_boxes=record.num_boxes, record=record)
