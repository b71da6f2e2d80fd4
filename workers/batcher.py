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
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from butd.detector.config import ExtractionConfig
from butd.images import ImageError, decode_image
from butd.store import ids
from butd.store.records import FeatureRecord, StoredRow
from butd.store.shards import Alias
from butd.workers.files import DEFAULT_LIMITS, ReadLimits
from butd.workers.isolate import put_isolated
from butd.workers.options import ExtractOptions
from butd.workers.outcomes import Cached, Extracted, Failed, Outcome
from butd.workers.protocol import JobShard, OnlineRequest, ProtocolError
from butd.workers.queue import Entry
from butd.workers.sources import FetchFn, ImageSource, online_source, read_source, ref_source

log = logging.getLogger(__name__)


BGRImage = npt.NDArray[np.uint8]
ReadFn = Callable[[int, int], list[Entry]]
ComputedFn = Callable[[list[Outcome]], None]


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
        source: where the bytes are (``butd.workers.sources``): uploaded to Redis, a file, an
            archive member or an object URL.
        content_sha256: the hash the gateway computed ("" when unknown: job items).
        request_id: the online request ("" for job items).
        deadline_ms: epoch ms after which an online task is dropped (0 = none).
    """

    entry: Entry
    image_id: str
    namespace: str
    options: ExtractOptions
    source: ImageSource
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
        source=online_source(req.image_key, req.path),
        content_sha256=req.content_sha256,
        request_id=req.request_id,
        deadline_ms=req.deadline_ms,
    )


def tasks_from_shard(entry: Entry) -> tuple[JobShard, list[Task]]:
    """The shard of a job entry and one task per item."""
    shard = JobShard.from_fields(entry.fields or {})
    tasks = [
        Task(entry, item.image_id, shard.namespace, shard.options, ref_source(item.ref))
        for item in shard.items
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
        return Loaded(task, reason=f"cannot read {str(task.source)!r}: {exc}")
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
            on_computed: called with each options group's outcomes (``Extracted`` ones carry their
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
            sum(isinstance(o, Extracted) for o in result),
            sum(isinstance(o, Cached) for o in result),
            sum(isinstance(o, Failed) for o in result),
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
            return [Failed(x.task, str(exc), x.content_sha256) for x in group]
        version = self.extractor.version_for(config)
        fresh = [x for x in group if x.ok]
        known = stored(self.sink, version, [x.content_sha256 for x in fresh])
        todo: dict[str, Loaded] = {}
        for x, is_stored in zip(fresh, known, strict=True):
            if not is_stored:
                todo.setdefault(x.content_sha256, x)
        computed = {
            o.content_sha256: o for o in self._extract(list(todo.values()), version, config)
        }
        outcomes = [_outcome(x, version, computed) for x in group]
        if on_computed is not None:
            on_computed(outcomes)
        new = [
            StoredRow(o.record, o.content_sha256, o.task.namespace)
            for o in computed.values()
            if isinstance(o, Extracted)
        ]
        aliases = [
            Alias(o.task.namespace, o.task.image_id, o.content_sha256)
            for o in outcomes
            if not isinstance(o, Failed)
        ]
        if new or aliases:
            lost = put_isolated(self.sink, f"{name}-{version}", new, version,
                                config.to_json(), aliases)  # fmt: skip
            outcomes = [lost.fail(o) for o in outcomes] if lost else outcomes
        return outcomes

    def _extract(
        self, todo: Sequence[Loaded], version: str, config: ExtractionConfig
    ) -> list[Extracted | Failed]:
        """One outcome per image, in order; an image the model fails on alone fails alone.

        Each record is made under its task's ``image_id`` (named once, here)."""
        if not todo:
            return []
        images = [x.staged if x.staged is not None else x.image for x in todo]
        names = [x.task.image_id for x in todo]
        try:
            records = self.extractor.extract(images, names, config=config)
        except Exception as exc:  # isolate the image that breaks the model, keep the others
            if len(todo) > 1:
                return [o for x in todo for o in self._extract([x], version, config)]
            log.warning("extraction of %s failed: %r", names[0], exc)
            reason = f"extraction failed: {type(exc).__name__}: {exc}"
            return [Failed(todo[0].task, reason, todo[0].content_sha256)]
        return [
            Extracted(x.task, x.content_sha256, version, record)
            for x, record in zip(todo, records, strict=True)
        ]


def _outcome(x: Loaded, version: str, computed: dict[str, Extracted | Failed]) -> Outcome:
    """The outcome of one loaded task, given what its group computed (by content)."""
    sha = x.content_sha256
    if not x.ok:
        return Failed(x.task, x.reason, sha)
    done = computed.get(sha)
    if done is None:
        return Cached(x.task, sha, version)
    if done.task is x.task:
        return done
    if isinstance(done, Failed):
        return Failed(x.task, done.reason, sha)
    # The same bytes under another id of this batch: computed once, answered under this id.
    return Extracted(x.task, sha, version, replace(done.record, image_id=x.task.image_id))
