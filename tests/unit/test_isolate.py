"""A record the store cannot hold fails only its own item, in a job batch and in the name rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from butd.store.records import StoredRow
from butd.store.shards import Alias
from butd.workers.batcher import Processor, load_task
from butd.workers.outcomes import Extracted, Failed
from tests.unit.test_batcher import FakeExtractor, FakeSink, png_bytes, task


class PickySink(FakeSink):
    """Refuses, as h5py does for a NUL, any shard holding the id ``poison.png``."""

    def put(
        self,
        name: str,
        records: Sequence[StoredRow],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[Alias] = (),
    ) -> None:
        if any(r.image_id == "poison.png" for r in records) or any(
            a.image_id == "poison.png" for a in aliases
        ):
            raise ValueError("VLEN strings do not support embedded NULLs")
        super().put(name, records, model_version, config, aliases)


def test_an_unstorable_record_fails_its_item_and_the_others_are_stored(tmp_path: Path) -> None:
    sink = PickySink()
    names = ["a.png", "poison.png", "c.png", "d.png"]
    tasks = [task(tmp_path, n, png_bytes(value=10 * k + 1)) for k, n in enumerate(names)]
    out = Processor(FakeExtractor(), sink, lambda k: None, max_pixels=10**6).run(tasks, "job")
    assert [type(o) for o in out] == [Extracted, Failed, Extracted, Extracted]
    assert isinstance(out[1], Failed)
    assert "cannot be stored" in out[1].reason and "NULLs" in out[1].reason
    assert sorted(a.image_id for a in sink.aliases) == ["a.png", "c.png", "d.png"]
    assert len(sink.stored) == 3  # one shard per good record after the shared one failed


def test_a_name_breaking_the_rule_fails_before_decoding(tmp_path: Path) -> None:
    good = task(tmp_path, "x.png", png_bytes())
    for bad in (replace(good, image_id="a\x00b"), replace(good, namespace="my photos")):
        loaded = load_task(bad, lambda k: None, max_pixels=10**6)
        assert not loaded.ok and loaded.image is None
        assert "an image id is" in loaded.reason or "a namespace is" in loaded.reason
    assert load_task(good, lambda k: None, max_pixels=10**6).ok
