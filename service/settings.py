"""Gateway settings: the only module of ``service`` that reads the environment.

Every value comes from an environment variable (``BUTD_`` prefix, except ``REDIS_URL`` which is
also accepted bare because that is what ``butd serve`` and docker-compose set) or a ``.env``
file. ``docs/service.md`` lists them all; keep that table in step with this class.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from butd.images import DEFAULT_MAX_PIXELS

FeatureDtype = Literal["float16", "float32"]


def _split_list(value: object) -> list[str]:
    """Comma-separated string (or a list) to a list of non-empty, stripped items."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    return [str(item).strip() for item in items if str(item).strip()]


class Settings(BaseSettings):
    """Configuration of the HTTP gateway (``butd.service.app.create_app``)."""

    model_config = SettingsConfigDict(
        env_prefix="BUTD_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        protected_namespaces=(),
    )

    # Redis URL of the queue. None = ``butd serve`` starts an embedded redis-server.
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("BUTD_REDIS_URL", "REDIS_URL")
    )
    # Root of the feature store (sealed shards, index, job uploads); shared with the workers.
    store_dir: Path = Path("butd-store")
    # fsspec URL of the sealed shards when they live in object storage (s3://bucket/prefix;
    # the workers' BUTD_STORE_URL); unset = STORE_DIR/shards. GETs then read only the blocks
    # holding the image's rows (ranged reads; butd.store.objects).
    store_url: str | None = None
    # URL prefixes batch jobs may read from (comma-separated, e.g. s3://datasets/coco/);
    # empty = URL sources refused. Credentials come from the store's standard environment.
    allowed_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # URL prefixes job exports may be written to (POST /v1/jobs/{id}/exports); empty = refused.
    export_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Cache key of the default extraction. None = read it from live worker heartbeats (the
    # newest heartbeat with a loaded model wins); set it to pin the gateway to one version.
    model_version: str | None = None
    # Largest accepted upload, bytes (20 MiB: a 50 MP JPEG is well below it). Over it: 413.
    max_body_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    # Largest accepted image, pixels (w * h, from the header; 50 MP). Over it: 413 with the value
    # and the limit. The same variable (and default) bounds what a worker decodes, so an image
    # the gateway or a job accepts is never refused later, and the reverse.
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    # Decode the whole image in the gateway before enqueueing (a truncated file is then a 422
    # before queueing). False (default) = header probe only: the gateway never holds decoded
    # pixels and the worker reports decode errors (still 422).
    full_decode_check: bool = False
    # Pixels (sum of w * h) the gateway decodes at once when ``full_decode_check`` is on; a
    # decode waits for room (at most the request timeout, then 503). ~10 bytes of memory per
    # pixel at the peak of a decode: 100 MP bounds decoding to ~1 GB. At least ``max_pixels``.
    decode_pixel_budget: int = Field(default=2 * DEFAULT_MAX_PIXELS, gt=0)
    # How long POST /v1/features waits for a worker, seconds. Past it: 504 with the request id.
    request_timeout_s: float = Field(default=30.0, gt=0)
    # After a 504 the request stays in the queue: a worker that reaches it within this many
    # more seconds still computes and caches it (a retry is then a cache hit); later, it is
    # dropped unprocessed.
    compute_grace_s: float = Field(default=30.0, ge=0)
    # Online requests allowed in the queue (waiting + being computed). Over it: 503 + Retry-After.
    max_queue_depth: int = Field(default=256, gt=0)
    # Share of the request timeout the online queue may fill: a request is admitted only when
    # the requests ahead of it finish within timeout x this at the workers' measured throughput
    # (butd.service.admission); otherwise an immediate 503 + Retry-After instead of a late 504.
    admission_margin: float = Field(default=0.7, gt=0, le=1)
    # Smallest Retry-After on 503 (queue full, no worker), seconds; a full queue answers the
    # time it needs to drain when that is longer.
    retry_after_s: int = Field(default=2, ge=1)
    # A worker heartbeat older than this is not "live", seconds (workers beat every few seconds).
    heartbeat_max_age_s: float = Field(default=15.0, gt=0)
    # How long the gateway reuses one read of the heartbeats (model version, admission), s.
    worker_cache_s: float = Field(default=1.0, ge=0)
    # Memory for recently read records in the gateway, MiB (a real 100x2048 fp16 record is
    # ~0.4 MiB); hot images are then served without an HDF5 read. 0 disables it.
    record_cache_mib: int = Field(default=256, ge=0)
    # Shard files the gateway keeps open at once (LRU of read-only HDF5 handles).
    max_open_shards: int = Field(default=64, ge=1)
    # Default dtype of base64 features in JSON responses (query ``dtype=`` overrides).
    json_feature_dtype: FeatureDtype = "float16"
    # API keys accepted as ``Authorization: Bearer KEY`` on /v1/*; empty = no authentication.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Directories batch jobs may read from (comma-separated); empty = server paths refused.
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Image references per queue shard of a batch job.
    job_shard_size: int = Field(default=256, gt=0)
    # Largest uploaded job archive (tar or zip), bytes, and its unpacked size and member count.
    max_archive_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_archive_unpacked_bytes: int = Field(default=8 * 1024**3, gt=0)
    max_archive_members: int = Field(default=200_000, gt=0)
    # Disk budget of pending job uploads (archives being received plus the unpacked files of
    # jobs not yet ended), bytes: 32 GiB, room for a few jobs at the archive caps above. An
    # upload that would pass it: 507 + Retry-After. Uploads of ended jobs are removed.
    max_pending_upload_bytes: int = Field(default=32 * 1024**3, gt=0)
    # How often the gateway removes the uploads of ended jobs, seconds.
    upload_sweep_s: float = Field(default=60.0, gt=0)
    # An upload whose job the queue does not know (a refused or crashed submission) is removed
    # once it is this old, seconds.
    upload_grace_s: float = Field(default=600.0, ge=0)
    # Largest JSON body of POST /v1/jobs, bytes (1 MiB: thousands of paths). Over it: 413.
    max_job_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # File name suffixes a directory scan treats as images (case-insensitive).
    image_suffixes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
    )
    # Slow clients (butd.service.limits). The request head must arrive within header_timeout_s of
    # the connection opening (or of the previous response), else 408 and close (``butd serve``
    # only: uvicorn reads the head before the app); the whole body within body_timeout_s of
    # the head (20 MiB in 60 s needs ~350 KB/s), else 408. Seconds.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    # Open connections ``butd serve`` handles at once (uvicorn limit_concurrency); past it new
    # requests get 503. Idle keep-alive connections are closed after keep_alive_s.
    max_connections: int = Field(default=512, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)
    # Listen address of ``butd serve``.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Weights for the embedded worker of ``butd serve`` (a path or a registry name).
    weights: str = "demo-synthetic"
    # Device of the embedded worker ("cpu", "cuda", "cuda:1").
    device: str = "cpu"

    @field_validator("api_keys", "image_suffixes", "allowed_urls", "export_urls", mode="before")
    @classmethod
    def _parse_str_list(cls, value: object) -> list[str]:
        return _split_list(value)

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: object) -> list[Path]:
        return [Path(item).expanduser() for item in _split_list(value)]

    @model_validator(mode="after")
    def _check_budgets(self) -> Settings:
        if self.decode_pixel_budget < self.max_pixels:
            raise ValueError(
                f"decode_pixel_budget ({self.decode_pixel_budget}) must be at least max_pixels "
                f"({self.max_pixels}): an image at the limit could never be decoded"
            )
        return self

    @property
    def jobs_upload_dir(self) -> Path:
        """Where uploaded job archives are unpacked (inside the store)."""
        return self.store_dir / "jobs" / "uploads"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()


class ClientSettings(BaseSettings):
    """Where the ``butd jobs`` / ``butd get`` commands find the gateway."""

    model_config = SettingsConfigDict(env_prefix="BUTD_", env_file=".env", extra="ignore")

    # Base URL of the gateway.
    url: str = "http://127.0.0.1:8000"
    # API key sent as ``Authorization: Bearer``; None = no header.
    api_key: str | None = None
    # HTTP timeout of one call, seconds (an online extraction waits up to the gateway's
    # BUTD_REQUEST_TIMEOUT_S, 30 s by default).
    timeout_s: float = Field(default=120.0, gt=0)
