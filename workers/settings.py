"""Worker settings: the only module of ``workers`` that reads the environment.

Each value is read from ``BUTD_<NAME>`` or the bare ``<NAME>`` (``REDIS_URL``, ``DEVICE``,
``BATCH_SIZE``, ... as docker-compose files usually spell them), or a ``.env`` file.
``docs/workers.md`` lists them all; keep that table in step with this class.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from butd.heads.demo import DEMO_DETECTOR, demo_head
from butd.images import DEFAULT_MAX_PIXELS


def _env(name: str, default: Any, **constraints: Any) -> Any:
    """A field read from BUTD_NAME or NAME."""
    upper = name.upper()
    return Field(
        default=default, validation_alias=AliasChoices(f"BUTD_{upper}", upper), **constraints
    )


def default_worker_id() -> str:
    """``host-pid``: unique per process, readable in ``XINFO CONSUMERS`` and heartbeats."""
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Configuration of one worker process (``butd worker``)."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, protected_namespaces=()
    )

    # Redis holding the streams, job hashes and heartbeats.
    redis_url: str = _env("redis_url", "redis://127.0.0.1:6379/0")
    # Root of the feature store (sealed shards + index), shared with the gateway.
    store_dir: Path = _env("store_dir", Path("butd-store"))
    # fsspec URL of the sealed shards (s3://bucket/prefix) when they live in object storage,
    # shared by workers on hosts without a common filesystem; unset = STORE_DIR/shards.
    # Shards are staged in STORE_DIR/shards, uploaded, then indexed. Credentials and endpoint
    # come from the store's standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    store_url: str | None = _env("store_url", None)
    # Canonical weights file or registry name.
    weights: str = _env("weights", "demo-synthetic")
    # Torch device: "cpu", "cuda", "cuda:1"; "auto" = cuda:0 when available, else cpu.
    device: str = _env("device", "auto")
    # Precision of the model: fp32 is the reference; fp16/bf16 are opt-in fast modes (CUDA).
    precision: Literal["fp32", "fp16", "bf16"] = _env("precision", "fp32")
    # ExtractionConfig fields replacing the checkpoint's defaults for this worker (JSON object,
    # e.g. {"min_boxes": 36, "max_boxes": 36}); requests can still override the box counts.
    extraction: dict[str, Any] = _env("extraction", {})
    # Most images per model call (online entries per read; job shards are cut into pieces of
    # this size). 8 fits a 600x1000 R101 batch in ~6 GB.
    batch_size: int = _env("batch_size", 8, ge=1, le=256)
    # Longest wait for an online batch to fill after its first image arrived, ms.
    batch_wait_ms: int = _env("batch_wait_ms", 10, ge=0, le=10_000)
    # How long an answered online batch may wait for others to share its shard, ms: one seal
    # (~20 ms of CPU for a small HDF5 file) per interval instead of one per batch. Entries are
    # acked after their seal, so this is also how long they stay pending (<< claim_idle_ms).
    seal_linger_ms: int = _env("seal_linger_ms", 200, ge=0, le=10_000)
    # Longest blocking read when the queues are empty, ms: bounds how late a worker notices
    # SIGTERM, the janitor's schedule and the heartbeat while idle.
    idle_block_ms: int = _env("idle_block_ms", 1000, ge=1, le=10_000)
    # An entry pending this long (ms) under any consumer is presumed lost and reclaimed. Must
    # exceed the worst batch time, or live work runs twice (long shards refresh their claim).
    claim_idle_ms: int = _env("claim_idle_ms", 60_000, ge=100)
    # Deliveries after which an entry is dead-lettered to butd:dlq and its items failed.
    max_deliveries: int = _env("max_deliveries", 3, ge=1)
    # How often the janitor reclaims and trims, seconds. Each run also takes over the pending
    # entries of workers whose heartbeat expired or whose loop is stuck (no CLAIM_IDLE_MS wait),
    # so a crashed worker's online requests are redone within HEARTBEAT_TTL_S + this.
    janitor_interval_s: float = _env("janitor_interval_s", 2.0, gt=0)
    # Acknowledged stream entries are kept this long (ms) for inspection before trimming.
    trim_keep_ms: int = _env("trim_keep_ms", 3_600_000, ge=0)
    # Heartbeat refresh period and TTL, seconds (TTL > 2 periods tolerates one missed beat).
    # The TTL is how long a crashed worker's entries wait before another worker takes them.
    heartbeat_s: float = _env("heartbeat_s", 2.0, gt=0)
    heartbeat_ttl_s: int = _env("heartbeat_ttl_s", 6, ge=1)
    # A main loop that has not moved (no turn, no batch finished) for this long is stuck,
    # seconds: /health/ready reports it and other workers take over its entries (each such
    # take-over counts a delivery: after MAX_DELIVERIES the entry is dead-lettered and its items
    # failed). Must exceed the worst time of one batch, including its reads.
    stall_after_s: float = _env("stall_after_s", 120.0, gt=0)
    # Job images are read only from regular files (a FIFO, device or socket fails its item at
    # once), each within this many seconds (a hung network mount fails the item, not the
    # worker), and of at most this many bytes (the file size is checked before reading).
    read_timeout_s: float = _env("read_timeout_s", 10.0, gt=0)
    max_file_bytes: int = _env("max_file_bytes", 64 * 1024 * 1024, ge=1)
    # Return freed heap to the OS after each batch (glibc malloc_trim; butd.workers.memory): keeps
    # the RSS of a long-running worker flat instead of at the high mark of its largest batch.
    malloc_trim: bool = _env("malloc_trim", True)
    # How long an online result waits in Redis for the gateway, seconds.
    result_ttl_s: int = _env("result_ttl_s", 600, ge=1)
    # Largest image a worker decodes, pixels (w * h, checked on the header before decoding).
    # The same variable and default as the gateway's BUTD_MAX_PIXELS (one limit everywhere).
    max_pixels: int = _env("max_pixels", DEFAULT_MAX_PIXELS, ge=1)
    # Threads that read, hash, decode and stage the images of the next piece while the model
    # runs the current one (butd.workers.pipeline); -1 = one per CPU core, at most 16 (decoding a
    # 640x480 JPEG takes ~4 ms of one core); 0 = load on the main loop, one image after another,
    # and seal job pieces there too (the sequential path).
    load_threads: int = _env("load_threads", -1, ge=-1, le=256)
    # Job pieces computed but not yet sealed and recorded, at most (the loop waits beyond): one
    # piece sealing while the next computes; more only absorbs a slow disk.
    seal_ahead: int = _env("seal_ahead", 2, ge=1, le=64)
    # Longest pause between reconnection attempts while Redis is unreachable, seconds.
    reconnect_max_s: float = _env("reconnect_max_s", 5.0, gt=0)
    # Trained caption / VQA heads (directories written by `butd heads train`), loaded at start
    # and served from butd:heads (butd.workers.heads_task); unset = this worker serves no such head.
    caption_model: Path | None = _env("caption_model", None)
    vqa_model: Path | None = _env("vqa_model", None)
    # With the packaged demo detector (WEIGHTS=demo-synthetic), an unset CAPTION_MODEL /
    # VQA_MODEL means the packaged demo heads (heads/demo, trained on synthetic scenes, every
    # answer marked as such); false = no head unless named.
    demo_heads: bool = _env("demo_heads", True)
    # How long a heads request waits for its record to be sealed and indexed, seconds (an
    # online answer precedes its seal by up to SEAL_LINGER_MS plus the seal itself).
    heads_record_wait_s: float = _env("heads_record_wait_s", 5.0, ge=0, le=60)
    # Consumer name in the group; default host-pid.
    worker_id: str = _env("worker_id", "")

    @model_validator(mode="after")
    def _check(self) -> WorkerSettings:
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise ValueError(
                f"heartbeat_ttl_s ({self.heartbeat_ttl_s}) must exceed heartbeat_s "
                f"({self.heartbeat_s})"
            )
        if not self.worker_id:
            self.worker_id = default_worker_id()
        if self.demo_heads and self.weights == DEMO_DETECTOR:
            self.caption_model = self.caption_model or demo_head("caption")
            self.vqa_model = self.vqa_model or demo_head("vqa")
        return self

    def torch_device(self) -> str:
        """The device string for torch, "auto" resolved."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
