"""Request and response bodies of the HTTP API (pydantic models; they also drive /docs).

Shapes: N regions of one image, D feature size.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from butd.store import ids
from butd.workers.options import ExtractOptions

# Paths one JSON job may name (each a file or a directory).
MAX_JOB_PATHS = 10_000

FeatureDtype = Literal["float16", "float32"]


class FeatureArray(BaseModel):
    """A dense little-endian array, base64 encoded."""

    dtype: FeatureDtype
    shape: list[int] = Field(description="[N, D]")
    encoding: Literal["base64"] = "base64"
    byte_order: Literal["little"] = "little"
    data: str


class ModelInfo(BaseModel):
    """Which weights and extraction config produced a record."""

    model_version: str
    description: str = ""


class FeaturesResponse(BaseModel):
    """Regions of one image (JSON rendering of a stored FeatureRecord)."""

    request_id: str | None = None
    image_id: str
    namespace: str | None = None
    sha256: str
    image_w: int
    image_h: int
    num_boxes: int
    boxes: list[list[float]] = Field(description="(N, 4) x1, y1, x2, y2 in original pixels")
    objects_id: list[int] = Field(description="(N,) 0-based into the object vocabulary")
    objects: list[str]
    objects_conf: list[float]
    attrs_id: list[int] = Field(description="(N,) 0-based into the attribute vocabulary")
    attributes: list[str]
    attrs_conf: list[float]
    features: FeatureArray
    grid: FeatureArray | None = Field(
        default=None, description="(G, G, D) grid features, when the extraction asked for them"
    )
    model_version: str
    model: ModelInfo
    cached: bool = Field(description="served from the store without reaching a worker")


class JobRequest(BaseModel):
    """A batch job over server-side files: paths or directories under the allowed roots."""

    paths: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1,
        max_length=MAX_JOB_PATHS,
        description="files or directories (recursed), each at most 4096 characters",
    )
    namespace: str = Field(
        default="default",
        description=f"namespace of the image ids: {ids.NAMESPACE_RULE}",
        json_schema_extra={"pattern": ids.NAMESPACE_PATTERN},
    )
    options: ExtractOptions = Field(default_factory=ExtractOptions)
    image_ids: Literal["path", "stem", "coco", "map"] = Field(
        default="path",
        description="how a file becomes its id (as butd extract --image-ids): path relative to "
        "its directory argument, stem, coco (COCO_{split}_{012d}.jpg and integer names -> the "
        "integer; other names are skipped with the reason), map (id_map)",
    )
    id_map: dict[str, str] | None = Field(
        default=None, description='map rule: {"relative/path.jpg": "id"}', max_length=1_000_000
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return ids.check_namespace(value)


class JobItemError(BaseModel):
    """One image of a job that failed, and why."""

    image_id: str
    reason: str


class JobStatus(BaseModel):
    """Progress of a batch job."""

    job_id: str
    state: str = Field(description="queued | running | done | failed | cancelled")
    total: int
    done: int
    failed: int
    errors: list[JobItemError] = Field(default_factory=list)
    images_per_s: float | None = None
    eta_s: float | None = None
    namespace: str | None = None


class JobCreated(BaseModel):
    """Answer to POST /v1/jobs."""

    job_id: str
    total: int
    shards: int
    skipped: list[JobItemError] = Field(
        default_factory=list, description="files found but not queued (not an image suffix)"
    )


class ErrorBody(BaseModel):
    """Every error response."""

    error: str
    detail: str
    request_id: str | None = None


class WorkerInfo(BaseModel):
    """One live worker, from its heartbeat."""

    worker_id: str
    device: str = ""
    model_version: str | None = None
    loaded: bool = False
    age_s: float
    heads: list[str] = Field(
        default_factory=list, description="trained heads it serves, sorted (caption, vqa)"
    )
    stuck: bool = Field(
        default=False,
        description="its main loop has not moved for longer than its STALL_AFTER_S: it does "
        "not count as ready and other workers take over its entries",
    )
    progress_age_s: float | None = Field(
        default=None, description="seconds since its main loop last moved (None: not reported)"
    )
    working_on: str = Field(default="", description="the stream entry it handles now")


class ReadyResponse(BaseModel):
    """GET /health/ready."""

    ready: bool
    reason: str = ""
    model_version: str | None = None
    workers: list[WorkerInfo] = Field(default_factory=list)
    heads: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "live workers with a loaded model serving each head, by task; every task is listed "
            "(0: POST /v1/caption or /v1/vqa answers 503 head_unavailable)"
        ),
    )


class HeadRegions(BaseModel):
    """The regions a head attended over (N of them), with their attention weights."""

    head: str = Field(description="the head's name from its checkpoint, e.g. updown")
    note: str = Field(
        default="",
        description="what the head is, from its checkpoint; the packaged demo heads say "
        "'synthetic demo: ...' (not trained on COCO / VQA)",
    )
    model_version: str = Field(description="model version of the features the head read")
    sha256: str = Field(description="content hash of the image")
    image_id: str | None = None
    namespace: str | None = None
    request_id: str
    cached: bool = Field(description="the features were in the store (no extraction ran)")
    image_w: int
    image_h: int
    num_boxes: int = Field(description="N, the image's regions")
    boxes: list[list[float]] = Field(description="(N, 4) x1, y1, x2, y2, original-image pixels")


class CaptionResponse(HeadRegions):
    """A caption with its attention: one row of N weights per generated word."""

    caption: str
    words: list[str]
    log_prob: float = Field(description="log-probability of the caption under the head")
    attention: list[list[float]] = Field(description="(T, N) weights per word, rows sum to 1")


class ScoredAnswer(BaseModel):
    """One candidate answer with its sigmoid score."""

    answer: str
    score: float


class VQAResponse(HeadRegions):
    """The best answer, the top answers and the attention per glimpse."""

    question: str
    answer: str
    score: float
    answers: list[ScoredAnswer] = Field(description="top answers, best first")
    attention: list[list[float]] = Field(description="(G, N) weights per glimpse")
