"""Messages of the Redis Streams protocol between the gateway and the workers (torch-free).

Pure data: key names, the dataclasses carried by stream entries and result lists, and their
encoding to Redis field maps / JSON. The Redis operations themselves live in ``butd.workers.queue``;
see its module docstring for the protocol as a whole.

Every encoder has a decoder that accepts the field map as Redis returns it (``bytes`` or ``str``
keys and values, depending on the client's ``decode_responses``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from butd.store.records import FeatureRecord
from butd.workers.options import ExtractOptions, bounds

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails
    from redis.typing import EncodableT, FieldT

# Streams, consumer group and dead letters.
ONLINE_STREAM = "butd:online"
JOBS_STREAM = "butd:jobs"
DLQ_STREAM = "butd:dlq"
GROUP = "workers"
STREAMS: tuple[str, ...] = (ONLINE_STREAM, JOBS_STREAM)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
ResultStatus = Literal["ok", "error", "expired"]
TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


class ProtocolError(ValueError):
    """A stream entry or stored value that does not follow the protocol."""


def job_state(value: Any) -> JobState:
    """A stored job state (bytes or str) checked against the five states."""
    state = text(value)
    try:
        return _STATES[state]
    except KeyError:
        raise ProtocolError(f"unknown job state {state!r}") from None


_STATES: dict[str, JobState] = {
    "queued": "queued",
    "running": "running",
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled",
}


def image_key(request_id: str) -> str:
    """Key of the uploaded bytes of one online request (a string with a TTL)."""
    return f"butd:image:{request_id}"


def result_key(request_id: str) -> str:
    """List the worker LPUSHes one ``OnlineResult`` onto; the gateway BLPOPs it."""
    return f"butd:result:{request_id}"


def model_key(model_version: str) -> str:
    """JSON ``ModelMeta`` of one model version (vocabularies, description); no TTL."""
    return f"butd:model:{model_version}"


def job_key(job_id: str) -> str:
    """Hash of one batch job: state, counters, timestamps, options."""
    return f"butd:job:{job_id}"


def job_errors_key(job_id: str) -> str:
    """Hash image_id -> reason of the job's failed items."""
    return f"butd:job:{job_id}:errors"


def job_seen_key(job_id: str) -> str:
    """Set of the job's image ids already counted (done or failed): makes counting idempotent."""
    return f"butd:job:{job_id}:seen"


def worker_key(worker_id: str) -> str:
    """Heartbeat of one worker: JSON ``Heartbeat`` with a TTL."""
    return f"butd:worker:{worker_id}"


WORKER_KEY_PATTERN = "butd:worker:*"


def text(value: Any) -> str:
    """A Redis reply value (bytes or str) as str."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def stream_fields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    """A str field map as the dict XADD takes (redis-py types its argument as an invariant
    ``dict[FieldT, EncodableT]``, which a ``dict[str, str]`` is not)."""
    return {k: v for k, v in fields.items()}


def decode_fields(fields: Mapping[Any, Any]) -> dict[str, str]:
    """A stream entry's field map with str keys and values."""
    return {text(k): text(v) for k, v in fields.items()}


def _require(fields: Mapping[str, str], name: str) -> str:
    try:
        return fields[name]
    except KeyError:
        raise ProtocolError(f"stream entry lacks field {name!r}; has {sorted(fields)}") from None


# The wire's numbers: JSON numbers, or strings a number parses from (as ``int()`` / ``float()``).
_OPTION_TYPES: dict[str, type[int] | type[float]] = {
    "min_boxes": int,
    "max_boxes": int,
    "conf_thresh": float,
    "grid_size": int,
}


def decode_options(data: str | Mapping[str, Any] | None) -> ExtractOptions:
    """The ``options`` field of a stream entry or job hash, validated (a worker's edge).

    Raises:
        ProtocolError: not a JSON object, an unknown name, a value that is not a number or
            breaks a rule of ``ExtractOptions``; the message names the rule and the value.
    """
    raw: Any = json.loads(data) if isinstance(data, str) else (data or {})
    if not isinstance(raw, Mapping):
        raise ProtocolError(f"options must be a JSON object; got {raw!r}")
    unknown = set(raw) - set(_OPTION_TYPES)
    if unknown:
        raise ProtocolError(f"unknown extraction options {sorted(unknown)}")
    try:
        numbers = {k: _OPTION_TYPES[k](v) for k, v in raw.items() if v is not None}
        return ExtractOptions.model_validate(numbers)
    except ValidationError as exc:
        problem = _wire_words(exc.errors()[0])
        raise ProtocolError(f"bad extraction options {dict(raw)!r}: {problem}") from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad extraction options {dict(raw)!r}: {exc}") from exc


def _wire_words(error: ErrorDetails) -> str:
    """An ``ExtractOptions`` error in the words workers have always reported it with."""
    if not error["loc"]:  # the model's own check
        value = error["input"]
        return f"need min_boxes <= max_boxes; got {value['min_boxes']}, {value['max_boxes']}"
    name, value = str(error["loc"][0]), error["input"]
    if name in ("min_boxes", "max_boxes") and error["type"] == "greater_than_equal":
        return f"{name} must be >= 1; got {value}"
    lo, hi = bounds(name)
    return f"{name} must be in [{lo:g}, {hi:g}]; got {value}"


@dataclass(frozen=True)
class OnlineRequest:
    """One image to extract now; one entry of ``butd:online``.

    Attributes:
        request_id: unique id; the result goes to ``result_key(request_id)``.
        content_sha256: sha256 hex of the image bytes (computed by the gateway).
        namespace: the caller's id space for ``image_id``.
        image_id: the caller's id of the image (an alias of the content).
        options: extraction overrides.
        deadline_ms: epoch milliseconds after which the request is dropped, not computed.
        image_key: Redis key holding the uploaded bytes (set by ``enqueue_online``), or "".
        path: absolute path of the image on storage shared with the workers, or "".
    """

    request_id: str
    content_sha256: str
    namespace: str
    image_id: str
    options: ExtractOptions = field(default_factory=ExtractOptions)
    deadline_ms: int = 0
    image_key: str = ""
    path: str = ""

    def to_fields(self) -> dict[str, str]:
        return {
            "request_id": self.request_id,
            "content_sha256": self.content_sha256,
            "namespace": self.namespace,
            "image_id": self.image_id,
            "options": self.options.to_json(),
            "deadline_ms": str(self.deadline_ms),
            "image_key": self.image_key,
            "path": self.path,
        }

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> OnlineRequest:
        f = decode_fields(raw)
        try:
            deadline = int(f.get("deadline_ms", "0") or 0)
        except ValueError as exc:
            raise ProtocolError(
                f"deadline_ms must be an integer; got {f['deadline_ms']!r}"
            ) from exc
        return cls(
            request_id=_require(f, "request_id"),
            content_sha256=f.get("content_sha256", ""),
            namespace=f.get("namespace", ""),
            image_id=f.get("image_id", ""),
            options=decode_options(f.get("options") or None),
            deadline_ms=deadline,
            image_key=f.get("image_key", ""),
            path=f.get("path", ""),
        )


@dataclass(frozen=True)
class JobItem:
    """One image of a batch job.

    Attributes:
        ref: absolute path, or ``ARCHIVE::MEMBER`` for a member of a .zip / .tar(.gz) archive.
        image_id: the caller's id of the image (unique within the job).
    """

    ref: str
    image_id: str


@dataclass(frozen=True)
class JobShard:
    """One entry of ``butd:jobs``: a slice of a job's items, processed and sealed together."""

    job_id: str
    shard_no: int
    items: tuple[JobItem, ...]
    options: ExtractOptions = field(default_factory=ExtractOptions)
    namespace: str = ""

    def to_fields(self) -> dict[str, str]:
        return {
            "job_id": self.job_id,
            "shard_no": str(self.shard_no),
            "items": json.dumps([{"ref": i.ref, "image_id": i.image_id} for i in self.items]),
            "options": self.options.to_json(),
            "namespace": self.namespace,
        }

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> JobShard:
        f = decode_fields(raw)
        try:
            items = tuple(
                JobItem(ref=str(i["ref"]), image_id=str(i["image_id"]))
                for i in json.loads(_require(f, "items"))
            )
            shard_no = int(_require(f, "shard_no"))
        except (TypeError, ValueError, KeyError) as exc:
            raise ProtocolError(f"bad job shard entry: {exc}") from exc
        return cls(
            job_id=_require(f, "job_id"),
            shard_no=shard_no,
            items=items,
            options=decode_options(f.get("options") or None),
            namespace=f.get("namespace", ""),
        )


@dataclass(frozen=True)
class OnlineResult:
    """What a worker reports for one online request.

    Attributes:
        request_id: the request answered.
        status: "ok" (features computed under (model_version, content_sha256)), "error"
            (``reason`` says why) or "expired" (the deadline passed before the worker reached it).
        model_version: the worker's model version ("" when nothing was computed).
        content_sha256: the image content key.
        reason: human-readable cause for "error" / "expired".
        num_boxes: regions computed (0 unless "ok").
        cached: True when the record was already stored and nothing was recomputed.
        timings: worker clock readings, epoch seconds: ``t_batch`` (the batch holding the
            request was formed), ``t_extracted`` (its records were computed), ``t_replied``
            (this result was pushed). Empty for results sent without computing.
        record: the computed record in its stored form (features in the store's dtype), sent
            before the worker seals it (``butd.workers.wire``); None when the record is only in the
            store (``cached``) or nothing was computed. Not part of the JSON form.
    """

    request_id: str
    status: ResultStatus
    model_version: str = ""
    content_sha256: str = ""
    reason: str = ""
    num_boxes: int = 0
    cached: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    record: FeatureRecord | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> str:
        """The result without its record, as a JSON object."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "record"}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> OnlineResult:
        raw = json.loads(data)
        if raw.get("status") not in ("ok", "error", "expired"):
            raise ProtocolError(f"bad result status {raw.get('status')!r}")
        raw.pop("record", None)
        return cls(**raw)


@dataclass(frozen=True)
class JobStatus:
    """A batch job as ``job_status`` reports it.

    Attributes:
        job_id: the job.
        state: queued | running | done | failed | cancelled.
        total: number of items.
        done: items stored (or found already stored).
        failed: items that failed, each with a reason in ``errors``.
        created_at, started_at, finished_at: epoch seconds (0.0 = not yet).
        images_per_s: (done + failed) / seconds since ``started_at`` (until ``finished_at``).
        eta_s: seconds left at that rate, None when unknown.
        errors: image_id -> reason (at most the first ``max_errors`` by image id).
        namespace: id space of the job's images.
        options: extraction overrides of the job.
    """

    job_id: str
    state: JobState
    total: int
    done: int
    failed: int
    created_at: float
    started_at: float
    finished_at: float
    images_per_s: float
    eta_s: float | None
    errors: dict[str, str]
    namespace: str
    options: ExtractOptions

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class Heartbeat:
    """Liveness record a worker refreshes in ``worker_key(worker_id)`` (JSON with a TTL).

    Attributes:
        worker_id: unique consumer name in the group.
        host, pid: where it runs.
        device: torch device string ("cuda:0", "cpu").
        model_version: version of the loaded model ("" until loaded).
        model: human-readable model description.
        loaded: True once the model is loaded and the worker reads the streams.
        batches, images, errors: counters since start.
        started_at, updated_at: epoch seconds.
        heads: tasks of the trained heads it serves on ``butd:heads`` ("caption", "vqa").
        progress_at: epoch seconds of the last turn of the worker's main loop (set by the loop
            itself, not by the heartbeat thread: a loop stuck on one item stops moving it).
        stall_after_s: the worker's ``STALL_AFTER_S``: a loop silent longer is stuck.
        working_on: what the loop is handling now ("" when idle), e.g. "butd:jobs 17-0".
        seconds_per_image: moving average of busy seconds per image processed (0 = none
            yet); the gateway's admission estimates throughput from it.
    """

    worker_id: str
    host: str
    pid: int
    device: str
    model_version: str = ""
    model: str = ""
    loaded: bool = False
    batches: int = 0
    images: int = 0
    errors: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    heads: tuple[str, ...] = ()
    progress_at: float = 0.0
    stall_after_s: float = 0.0
    working_on: str = ""
    seconds_per_image: float = 0.0

    def stalled(self, now: float) -> bool:
        """True when the main loop has not moved for more than ``stall_after_s`` at ``now``."""
        return self.stall_after_s > 0 and 0 < self.progress_at < now - self.stall_after_s

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> Heartbeat:
        raw = json.loads(data)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        known["heads"] = tuple(known.get("heads", ()))
        return cls(**known)


def shard_items(items: Sequence[JobItem], shard_size: int) -> list[tuple[JobItem, ...]]:
    """Split a job's items into consecutive shards of at most ``shard_size``."""
    if shard_size < 1:
        raise ProtocolError(f"shard_size must be >= 1; got {shard_size}")
    return [tuple(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]
