"""The heads queue: caption / VQA requests over stored features (torch-free, gateway-shared).

Stream ``butd:heads``, consumer group ``workers``: one entry = one question to a trained head
about one stored record (``HeadsRequest.to_fields``): ``request_id``, ``task`` (caption | vqa),
``model_version`` and ``content_sha256`` (the stored record's key), ``question`` (vqa),
``beam_size``, ``max_len``, ``top``, ``deadline_ms`` (epoch ms, 0 = none). Only workers started
with ``CAPTION_MODEL`` or ``VQA_MODEL`` read it (``butd.workers.heads_task``), in a thread of their
own beside the extraction loop, so a long extraction batch does not hold a caption back.

The answer is one JSON ``HeadsResult`` LPUSHed onto ``butd:heads:result:{request_id}`` with an
EXPIRE; the gateway BLPOPs it. Heads requests are cheap and have no side effects: the entry is
acked once answered, and is not reclaimed after a crash (the gateway answers 504 and the client
retries). The stream is capped (``XADD MAXLEN ~ STREAM_MAXLEN``) instead of being trimmed by
the janitor.

Admission (depth = the group's lag + pending, checked and added in one Lua script), the depth
itself, the group and the reply list are the primitives the online queue uses too
(``butd.workers.streams``); only the stream, the keys and the message types are the heads' own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from butd.workers.protocol import ProtocolError, decode_fields
from butd.workers.streams import enqueue_if_room, push_reply, wait_reply

if TYPE_CHECKING:
    import redis

    Client = redis.Redis

HEADS_STREAM = "butd:heads"
# Approximate cap of the stream's length (acked entries are not trimmed otherwise).
STREAM_MAXLEN = 10_000

HeadTask = Literal["caption", "vqa"]
HeadStatus = Literal["ok", "error", "expired", "unavailable"]
TASKS: tuple[HeadTask, ...] = ("caption", "vqa")


def heads_result_key(request_id: str) -> str:
    """The list a heads answer is pushed onto."""
    return f"butd:heads:result:{request_id}"


@dataclass(frozen=True)
class HeadsRequest:
    """One caption or VQA request about a stored record.

    Attributes:
        request_id: unique id; the answer goes to ``heads_result_key(request_id)``.
        task: "caption" or "vqa".
        model_version, content_sha256: the stored record's key in the feature index.
        question: the question (vqa; "" for captions).
        beam_size: caption beam size (Up-Down: 5).
        max_len: longest caption, words.
        top: how many answers to return (vqa).
        deadline_ms: epoch ms after which nobody waits for the answer (0 = none).
    """

    request_id: str
    task: HeadTask
    model_version: str
    content_sha256: str
    question: str = ""
    beam_size: int = 5
    max_len: int = 20
    top: int = 5
    deadline_ms: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ProtocolError(f"task must be one of {TASKS}; got {self.task!r}")
        if self.task == "vqa" and not self.question.strip():
            raise ProtocolError("a vqa request needs a question")

    def to_fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> HeadsRequest:
        """Parse an entry's fields (bytes or str); ProtocolError when malformed."""
        fields = decode_fields(raw)
        try:
            return cls(
                request_id=fields["request_id"],
                task=fields["task"],  # type: ignore[arg-type]  # checked in __post_init__
                model_version=fields["model_version"],
                content_sha256=fields["content_sha256"],
                question=fields.get("question", ""),
                beam_size=int(fields.get("beam_size", 5)),
                max_len=int(fields.get("max_len", 20)),
                top=int(fields.get("top", 5)),
                deadline_ms=int(fields.get("deadline_ms", 0)),
            )
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"malformed heads entry: {exc!r}") from None


@dataclass(frozen=True)
class HeadsResult:
    """A worker's answer to one ``HeadsRequest`` (JSON on the wire).

    Attributes:
        status: ok | error (this request failed) | expired | unavailable (no such head here).
        reason: why, when not ok.
        head: the head's name (e.g. "updown"), from its checkpoint.
        note: what the head is, from its checkpoint (the packaged demo heads: "synthetic
            demo: ..."); "" when the checkpoint has none.
        words: the caption's words (caption).
        log_prob: the caption's log-probability (caption).
        answers: top answers with their sigmoid scores, best first (vqa).
        attention: (T, N) weights per caption word, or (G, N) per glimpse (vqa).
        boxes: (N, 4) region boxes x1, y1, x2, y2 in original-image pixels.
        image_w, image_h: the original image size, pixels.
    """

    request_id: str
    status: HeadStatus
    reason: str = ""
    model_version: str = ""
    head: str = ""
    note: str = ""
    words: list[str] = field(default_factory=list)
    log_prob: float = 0.0
    answers: list[tuple[str, float]] = field(default_factory=list)
    attention: list[list[float]] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    image_w: int = 0
    image_h: int = 0

    def to_json(self) -> str:
        """The result as a JSON object."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> HeadsResult:
        """Parse a JSON answer; ProtocolError on an unknown status."""
        raw = json.loads(data)
        if raw.get("status") not in ("ok", "error", "expired", "unavailable"):
            raise ProtocolError(f"bad heads result status {raw.get('status')!r}")
        raw["answers"] = [(str(a), float(s)) for a, s in raw.get("answers", [])]
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def enqueue_heads(r: Client, request: HeadsRequest, *, max_depth: int) -> int | None:
    """Queue one heads request unless ``max_depth`` are waiting or in progress, atomically
    (``butd.workers.streams.enqueue_if_room``, the online queue's admission); the stream is
    capped at about ``STREAM_MAXLEN`` entries.

    Returns:
        None when queued, else the depth that refused it.
    """
    fields = request.to_fields()
    return enqueue_if_room(r, HEADS_STREAM, fields, max_depth=max_depth, maxlen=STREAM_MAXLEN)


def wait_heads_result(r: Client, request_id: str, timeout_s: float) -> HeadsResult | None:
    """Block until a worker answers ``request_id``; None after ``timeout_s`` seconds."""
    return wait_reply(r, heads_result_key(request_id), timeout_s, HeadsResult.from_json)


def post_heads_result(r: Client, result: HeadsResult, *, ttl_s: int = 600) -> None:
    """Push one answer for the gateway (LPUSH + EXPIRE in one MULTI)."""
    push_reply(r, heads_result_key(result.request_id), result.to_json(), ttl_s=ttl_s)
