"""The OpenAPI document is complete and true: every ``$ref`` resolves, every error is the one
body, and a bounded schemathesis run (all checks) against the app (in-process ASGI, fakes)
finds no failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig

from butd.service.app import create_app
from butd.service.settings import Settings
from tests.unit.app_fakes import FakeQueue, FakeStore, png_bytes

_ROOT = Path(__file__).resolve().parent / "_openapi_data"  # allowed root (fresh per session)


def _app(tmp: Path) -> Any:
    queue = FakeQueue(FakeStore())
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "a.png").write_bytes(png_bytes())
    settings = Settings(store_dir=tmp / "store", redis_url="redis://unused", allowed_roots=[data])
    return create_app(settings, queue=queue, store=queue.store)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_document_is_complete(tmp_path: Path) -> None:
    doc = _app(tmp_path).openapi()
    schemas = doc["components"]["schemas"]
    refs = set(_refs(doc))
    assert "#/components/schemas/JobRequest" in refs
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)  # nothing dangling
    assert "HTTPValidationError" not in schemas
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/health/ready":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method)
    submit = doc["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"400", "409", "413", "415", "422", "507"} <= set(submit)
    sha = doc["paths"]["/v1/features/sha256/{sha256}"]["get"]["parameters"][0]["schema"]
    assert sha["pattern"] == "^[0-9a-fA-F]{64}$"
    export = doc["paths"]["/v1/jobs/{job_id}/export"]["get"]["parameters"]
    fmt = next(p for p in export if p["name"] == "format")["schema"]
    assert sorted(fmt["enum"]) == sorted(
        ["h5-dense", "h5-grid", "h5-ragged", "lxmert-tsv", "npz", "npz-mcan", "tsv"]
    )


# Schema-valid requests that only the server can refuse: an upload that must decode as an image
# (415 / 422), min_boxes <= max_boxes, a VQA question given in the query or the form, job paths
# that must exist and hold images. Every other check, and these for every other status, stands.
_CONFIG = """
[[operations]]
include-path-regex = "^/v1/(features|caption|vqa|jobs)$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "413",
                                                     "415", "422"]
"""

schema = schemathesis.openapi.from_asgi(
    "/openapi.json",
    _app(Path(__import__("tempfile").mkdtemp(prefix="butd-openapi-"))),
    config=SchemathesisConfig.from_str(_CONFIG),
)
load_all_checks()
ALL_CHECKS = CHECKS.get_all()


@pytest.mark.timeout(120)
@schema.parametrize()
@hypothesis.settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_schemathesis_finds_no_failure(case: Any) -> None:
    case.call_and_validate(checks=ALL_CHECKS)
