"""One typed outcome per task: Extracted (with its record), Cached, or Failed (with its reason);
the record is named by its task's image id when the model makes it."""

from __future__ import annotations

from pathlib import Path

from butd.workers.batcher import Processor
from butd.workers.outcomes import Cached, Extracted, Failed
from butd.workers.replies import online_result
from tests.unit.test_batcher import FakeExtractor, FakeSink, png_bytes, task


def test_a_failed_image_is_a_failed_outcome_with_its_reason(tmp_path: Path) -> None:
    proc = Processor(FakeExtractor(), FakeSink(), lambda k: None, max_pixels=10**6)
    (out,) = proc.run([task(tmp_path, "bad.png", b"not an image")], "n")
    assert isinstance(out, Failed) and out.task.image_id == "bad.png"
    assert out.reason.startswith("NotAnImageError")
    result = online_result(out)
    assert (result.status, result.reason, result.record) == ("error", out.reason, None)


def test_each_case_answers_as_before(tmp_path: Path) -> None:
    ext, sink = FakeExtractor(), FakeSink()
    proc = Processor(ext, sink, lambda k: None, max_pixels=10**6)
    (new,) = proc.run([task(tmp_path, "a.png", png_bytes(value=4))], "n1")
    (old,) = proc.run([task(tmp_path, "b.png", png_bytes(value=4))], "n2")
    assert isinstance(new, Extracted) and isinstance(old, Cached)
    fresh = online_result(new, "float16")
    assert (fresh.status, fresh.cached, fresh.num_boxes) == ("ok", False, 2)
    assert fresh.record is not None and fresh.record.image_id == "a.png"
    cached = online_result(old, "float16")
    assert (cached.status, cached.cached, cached.num_boxes, cached.record) == ("ok", True, 0, None)
    assert cached.model_version == fresh.model_version == new.model_version


def test_the_record_is_named_once_by_its_task(tmp_path: Path) -> None:
    """The model is given the tasks' image ids (not content hashes to be renamed later), and the
    record stored is the one answered."""
    ext, sink = FakeExtractor(), FakeSink()
    proc = Processor(ext, sink, lambda k: None, max_pixels=10**6)
    out = proc.run([task(tmp_path, "a-1.png", png_bytes(value=1))], "n")
    assert ext.calls == [["a-1.png"]]
    (stored,) = sink.stored.values()
    assert isinstance(out[0], Extracted) and stored is out[0].record
    assert stored.image_id == "a-1.png"
