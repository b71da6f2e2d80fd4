"""Registry, vocabularies and ``resolve``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from butd.detector.config import ModelSpec, tiny_arch
from butd.detector.weights import (
    REGISTRY,
    WeightsError,
    get_entry,
    load_vocab,
    resolve,
    save_canonical,
    vocab_synonyms,
)
from butd.detector.weights import registry as registry_module
from butd.detector.weights.registry import (
    VG_ATTRIBUTES_VOCAB,
    VG_OBJECTS_VOCAB,
    canonical_path,
    default_weights_dir,
)
from tests.unit.synthetic_checkpoints import random_canonical_state_dict

OBJECTS_SHA256 = "d985096938db111f585a311ff0a2ee9092fbc325c3a619ac9622e57e5389722f"
ATTRIBUTES_SHA256 = "19981b5a288f284c576545a21de78634f1a78c26b6949f7acf12b924739fdc66"


def test_vocab_files_are_the_published_bytes() -> None:
    assert hashlib.sha256(VG_OBJECTS_VOCAB.read_bytes()).hexdigest() == OBJECTS_SHA256
    assert hashlib.sha256(VG_ATTRIBUTES_VOCAB.read_bytes()).hexdigest() == ATTRIBUTES_SHA256


def test_vocabularies_take_the_first_synonym() -> None:
    objects, attributes = load_vocab(VG_OBJECTS_VOCAB), load_vocab(VG_ATTRIBUTES_VOCAB)
    assert (len(objects), len(attributes)) == (1600, 400)
    assert objects[:3] == ("yolk", "goal", "bathroom")
    assert objects[16] == "stop sign"  # line "stop sign,stopsign"
    assert objects[-1] == "buoy"
    assert attributes[0] == "gray"  # line "gray,grey"
    assert attributes[-1] == "leaning"
    synonyms = vocab_synonyms(VG_ATTRIBUTES_VOCAB)
    assert synonyms[1] == ("multi colored", "multi-colored", "multicolored")
    assert len(set(objects)) == 1600


def test_crlf_vocab_reads_the_same(tmp_path: Path) -> None:
    crlf = tmp_path / "objects_vocab.txt"
    crlf.write_bytes(VG_OBJECTS_VOCAB.read_bytes().replace(b"\n", b"\r\n"))
    assert load_vocab(crlf) == load_vocab(VG_OBJECTS_VOCAB)


def test_every_entry_is_complete() -> None:
    formats = {"airsplay", "hf", "milvlg", "caffe", "unsupported", "canonical"}
    for entry in REGISTRY.values():
        assert entry.format in formats, entry.name
        assert entry.description, entry.name
        assert entry.sha256 is None or len(entry.sha256) == 64
        if entry.kind == "remote":
            assert entry.urls and all(u.startswith(("http://", "https://")) for u in entry.urls)
        if not entry.convertible and entry.kind == "remote":
            assert entry.note, entry.name
    assert {e.boxes for e in REGISTRY.values() if e.convertible} == {"36", "10-100"}
    assert get_entry("hf-frcnn-vg-finetuned").urls == (
        "https://huggingface.co/unc-nlp/frcnn-vg-finetuned/resolve/main/pytorch_model.bin",
    )


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(WeightsError, match="airsplay-attr-36"):
        get_entry("nope")


def test_default_weights_dir_reads_the_given_environment(tmp_path: Path) -> None:
    assert default_weights_dir({"BUTD_WEIGHTS_DIR": str(tmp_path)}) == tmp_path
    assert default_weights_dir({}) == Path("~/.cache/butd/weights").expanduser()


def _canonical(path: Path) -> Path:
    arch = tiny_arch()
    spec = ModelSpec(arch=arch)
    return save_canonical(
        path, random_canonical_state_dict(arch, 0), spec, source_sha256=None, source_format="t"
    )


def test_resolve_a_path(tmp_path: Path) -> None:
    path = _canonical(tmp_path / "mine.safetensors")
    assert resolve(path) == path
    assert resolve(str(path)) == path
    other = tmp_path / "raw.pkl"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match="butd weights convert"):
        resolve(other)


def test_resolve_a_fetched_name(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="butd weights fetch airsplay-attr-36"):
        resolve("airsplay-attr-36", tmp_path)
    target = canonical_path(get_entry("airsplay-attr-36"), tmp_path)
    assert target == tmp_path / "airsplay-attr-36.safetensors"
    _canonical(target)
    assert resolve("airsplay-attr-36", tmp_path) == target


def test_resolve_neither_file_nor_name(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="neither a file nor a registry name"):
        resolve(tmp_path / "missing.safetensors")


def test_resolve_unsupported_entry_explains(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no attribute head"):
        resolve("airsplay-noattr-36", tmp_path)


def test_resolve_the_packaged_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "PACKAGE_DIR", tmp_path)
    with pytest.raises(WeightsError, match="not built"):
        resolve("demo-synthetic")
    demo = _canonical(tmp_path / "demo" / "butd-demo.safetensors")
    assert resolve("demo-synthetic") == demo
