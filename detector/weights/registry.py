"""Known weight files: where they live, what format, which box model, which vocabularies.

Weights are data (STYLE §8): one entry per checkpoint. No publisher gives a sha256 for any of
these files, so ``sha256`` is None until someone records the digest that ``fetch`` prints;
a recorded digest is then enforced. URLs are exactly those of the publishers' READMEs
(reference §1.8, §2.5, §3.3, §10).

``resolve(name_or_path)`` turns what a user types (a canonical file path or a registry name)
into the path of a canonical file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from butd.detector.config import ArchConfig
from butd.detector.weights.canonical import WeightsError, is_canonical_file

PACKAGE_DIR = Path(__file__).resolve().parent
VG_OBJECTS_VOCAB = PACKAGE_DIR / "vocab" / "objects_vocab.txt"
VG_ATTRIBUTES_VOCAB = PACKAGE_DIR / "vocab" / "attributes_vocab.txt"
DEFAULT_WEIGHTS_DIR = "~/.cache/butd/weights"

_SHAREPOINT = "https://awma1-my.sharepoint.com/:u:/g/personal/yuz_l0_tn/"
_CAFFE_NOTE = "the ground truth: Caffe conventions (+1 boxes, Caffe anchors, 2-way RPN softmax)"


@dataclass(frozen=True)
class RegistryEntry:
    """One published (or packaged) weight file.

    Attributes:
        name: registry name used on the command line.
        filename: the publisher's file name (downloads are saved under it).
        format: "airsplay", "hf", "milvlg", "caffe", "unsupported" or "canonical".
        urls: download URLs, tried in order.
        sha256: hex digest of the published file, when recorded; None = not published.
        boxes: the box model it reproduces: "10-100", "36", or "" (demo).
        description: what these weights are.
        note: caveats (shown by ``butd weights list``; the error for unsupported formats).
        kind: "remote" (downloaded) or "packaged" (ships inside the package).
        path: packaged file, relative to the ``detector/weights`` package.
        arch: architecture the file must fit.
        vocab: (objects, attributes) vocabulary files, or None (the file's spec has them).
    """

    name: str
    filename: str
    format: str
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    boxes: str = ""
    description: str = ""
    note: str = ""
    kind: Literal["remote", "packaged"] = "remote"
    path: str | None = None
    arch: ArchConfig = field(default_factory=ArchConfig)
    vocab: tuple[Path, Path] | None = (VG_OBJECTS_VOCAB, VG_ATTRIBUTES_VOCAB)

    @property
    def convertible(self) -> bool:
        """True when ``fetch`` can turn the download into a canonical file."""
        return self.format in ("airsplay", "hf", "milvlg", "caffe")


_ENTRIES = (
    RegistryEntry(
        name="caffe-10-100",
        filename="resnet101_faster_rcnn_final.caffemodel",
        format="caffe",
        urls=(
            "https://storage.googleapis.com/up-down-attention/resnet101_faster_rcnn_final.caffemodel",
            "https://www.dropbox.com/s/5xethd2nxa8qrnq/resnet101_faster_rcnn_final.caffemodel?dl=1",
        ),
        boxes="10-100",
        description="original Caffe model, 10-100 boxes (peteanderson80/bottom-up-attention)",
        note=_CAFFE_NOTE,
    ),
    RegistryEntry(
        name="caffe-36",
        filename="resnet101_faster_rcnn_final_iter_320000.caffemodel",
        format="caffe",
        urls=(
            "https://storage.googleapis.com/bottom-up-attention/resnet101_faster_rcnn_final_iter_320000.caffemodel",
            "https://www.dropbox.com/s/2h4hmgcvpaewizu/resnet101_faster_rcnn_final_iter_320000.caffemodel?dl=1",
        ),
        boxes="36",
        description="original Caffe model, 36 boxes (COCO trainval_36, LXMERT features)",
        note=_CAFFE_NOTE + "; the googleapis link is reported dead (issue #100)",
    ),
    RegistryEntry(
        name="airsplay-attr-36",
        filename="faster_rcnn_from_caffe_attr.pkl",
        format="airsplay",
        urls=(
            "http://nlp.cs.unc.edu/models/faster_rcnn_from_caffe_attr.pkl",
            "https://nlp1.cs.unc.edu/models/faster_rcnn_from_caffe_attr.pkl",
        ),
        boxes="36",
        description="airsplay detectron2 conversion of the Caffe 36-box model, with attributes",
        note="detectron2 conventions (anchors 64..512, no +1, torchvision NMS)",
    ),
    RegistryEntry(
        name="airsplay-attr-10-100",
        filename="faster_rcnn_from_caffe_attr_original.pkl",
        format="airsplay",
        urls=(
            "http://nlp.cs.unc.edu/models/faster_rcnn_from_caffe_attr_original.pkl",
            "https://nlp1.cs.unc.edu/models/faster_rcnn_from_caffe_attr_original.pkl",
        ),
        boxes="10-100",
        description="airsplay detectron2 conversion of the Caffe 10-100 model, with attributes",
        note="detectron2 conventions (anchors 64..512, no +1, torchvision NMS)",
    ),
    RegistryEntry(
        name="airsplay-noattr-36",
        filename="faster_rcnn_from_caffe.pkl",
        format="unsupported",
        urls=("http://nlp.cs.unc.edu/models/faster_rcnn_from_caffe.pkl",),
        boxes="36",
        description="airsplay conversion without the attribute head",
        note="no attribute head: butd needs one; use airsplay-attr-36",
    ),
    RegistryEntry(
        name="hf-frcnn-vg-finetuned",
        filename="pytorch_model.bin",
        format="hf",
        urls=("https://huggingface.co/unc-nlp/frcnn-vg-finetuned/resolve/main/pytorch_model.bin",),
        boxes="36",
        description="HuggingFace unc-nlp/frcnn-vg-finetuned (LXMERT demo FRCNN)",
        note=(
            "believed equal to airsplay-attr-36 (unverified); the hub config.yaml (test "
            "scales, NMS list, anchor offset) is not read"
        ),
    ),
    RegistryEntry(
        name="milvlg-r101-k36",
        filename="bua-caffe-frcn-r101-k36.pth",
        format="milvlg",
        urls=(_SHAREPOINT + "EUKhQ3hSRv9JrrW64qpNLSIBGoOjEGCkF8zvgBP9gKax-w?download=1",),
        boxes="36",
        description="MILVLG bottom-up-attention.pytorch caffe-mode R101, 36 boxes",
        note="Caffe conventions with detectron2 anchors 4..32 and the delta clamp",
    ),
    RegistryEntry(
        name="milvlg-r101-k10-100",
        filename="bua-caffe-frcn-r101-k10-100.pth",
        format="milvlg",
        urls=(_SHAREPOINT + "EaXvCC3WjtlLvvEfLr3oa8UBLA21tcLh4L8YLbYXl6jgjg?download=1",),
        boxes="10-100",
        description="MILVLG caffe-mode R101, 10-100 boxes",
        note=(
            "Caffe conventions with detectron2 anchors 4..32 and the delta clamp; the same "
            "file circulates as bua-caffe-frcn-r101_with_attributes.pth"
        ),
    ),
    RegistryEntry(
        name="demo-synthetic",
        filename="butd-demo.safetensors",
        format="canonical",
        kind="packaged",
        path="demo/butd-demo.safetensors",
        description="tiny demo model trained on synthetic shapes (ships with the package)",
        note="not a Visual Genome model: for demos and tests only",
        vocab=None,
    ),
)

REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in _ENTRIES}


def get_entry(name: str) -> RegistryEntry:
    """The registry entry called ``name``.

    Raises:
        WeightsError: unknown name (the message lists the known ones).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}") from None


def default_weights_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where fetched weights live: ``$BUTD_WEIGHTS_DIR`` or ``~/.cache/butd/weights``."""
    return Path(environ.get("BUTD_WEIGHTS_DIR") or DEFAULT_WEIGHTS_DIR).expanduser()


def canonical_path(entry: RegistryEntry, weights_dir: Path | None = None) -> Path:
    """Path of the entry's canonical file (packaged file, or ``weights_dir/NAME.safetensors``)."""
    if entry.kind == "packaged":
        assert entry.path is not None
        return PACKAGE_DIR / entry.path
    return (weights_dir or default_weights_dir()) / f"{entry.name}.safetensors"


def resolve(name_or_path: str | os.PathLike[str], weights_dir: Path | None = None) -> Path:
    """The canonical file a user means.

    Args:
        name_or_path: a path to a canonical ``.safetensors`` file, or a registry name
            (fetched into ``weights_dir``, or the packaged demo).
        weights_dir: where fetched weights live (default ``default_weights_dir()``).

    Returns:
        Path of an existing canonical file.

    Raises:
        WeightsError: a file that is not canonical, a name not yet fetched, an unknown name.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if not is_canonical_file(path):
            raise WeightsError(
                f"{path} is not a butd canonical file; convert it first: "
                f"butd weights convert {path} --out NAME.safetensors"
            )
        return path
    if str(name_or_path) not in REGISTRY:
        raise WeightsError(
            f"{name_or_path!r} is neither a file nor a registry name (known: {', '.join(REGISTRY)})"
        )
    entry = REGISTRY[str(name_or_path)]
    target = canonical_path(entry, weights_dir)
    if target.is_file():
        return target
    if entry.kind == "packaged":
        raise WeightsError(f"packaged weights {entry.name!r} are missing: {target} not built")
    if not entry.convertible:
        raise WeightsError(f"{entry.name}: {entry.note}")
    raise WeightsError(
        f"{entry.name} is not fetched into {target.parent}: run `butd weights fetch {entry.name}`"
    )


def vocab_synonyms(path: str | os.PathLike[str]) -> list[tuple[str, ...]]:
    """Each line of a vocabulary file as its comma-separated synonyms (``gray,grey``)."""
    text = Path(path).read_text(encoding="utf-8")
    return [tuple(s.strip() for s in line.split(",")) for line in text.splitlines() if line.strip()]


def load_vocab(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The first synonym of each line: index i = class i+1 (0 is background / no-attribute)."""
    return tuple(names[0] for names in vocab_synonyms(path))
