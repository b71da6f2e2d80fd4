"""Each export read the way its consumer project reads it, over COCO-named files.

The readers below are written here from each project's loading logic (not copied):

* bottom-up-attention-vqa: ``tools/detection_features_converter.py`` (TSV -> ``int(image_id)``,
  spatial features) and ``dataset.py`` (``train36_imgid2idx.pkl`` looked up with the integer
  ``image_id`` of the VQA questions; ``image_features[idx]`` with no mask);
* ban-vqa: ``tools/adaptive_detection_features_converter.py`` and ``dataset.py`` with
  ``adaptive=True`` (``train_imgid2idx.pkl``, ``pos_boxes`` slices);
* LXMERT: ``src/utils.py::load_obj_tsv`` and ``src/tasks/vqa_data.py`` (keeps a question only
  when its ``img_id``, e.g. ``COCO_val2014_000000000042``, is a loaded ``img_id``);
* self-critical.pytorch: ``scripts/make_bu_data.py`` (``int(image_id)``, ``{id}.npz`` with
  ``feat``, ``_fc`` mean, ``_box``) and its loader's ``str(cocoid) + '.npz'``;
* MCAN-vqa / OpenVQA: ``img_feat_path_load`` (``str(int(name.split('_')[-1].split('.')[0]))``)
  and ``x.transpose((1, 0))`` padded to 100 rows;
* MILVLG bottom-up-attention.pytorch's writer: ``{stem}.npz`` with ``x (N, D)``, ``bbox``,
  ``num_bbox`` and ``info["image_id"] = stem``.

Every reader must get every image, under the id its annotations use, with the stored values
(features are fp16 in the store, exported as float32: equal after the exact widening).
"""

from __future__ import annotations

import base64
import csv
import glob
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from butd.store.exporters import EXPORTERS
from butd.store.h5 import FeatureFile
from butd.store.h5_writer import write_feature_file
from butd.store.records import FeatureRecord
from tests.unit.test_h5 import make_records, meta

COCO_IDS = (42, 73, 9, 581929, 1000000)


def coco_records(min_boxes: int, max_boxes: int) -> list[FeatureRecord]:
    recs = make_records(len(COCO_IDS), min_boxes=min_boxes, max_boxes=max_boxes, seed=3)
    return [
        replace(r, image_id=f"COCO_val2014_{i:012d}.jpg")
        for r, i in zip(recs, COCO_IDS, strict=True)
    ]


def stored(path: Path) -> dict[int, FeatureRecord]:
    """The store's records by COCO integer id (features widened to float32)."""
    with FeatureFile(path) as ff:
        return {int(r.image_id[13:25]): r for r in ff}


def export(src: Path, fmt: str, out: Path) -> Path:
    with FeatureFile(src) as ff:
        EXPORTERS[fmt](ff, out)
    return out


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``butd extract val2014/`` of five COCO files, 10-100 style (2-12 regions here)."""
    path = tmp_path_factory.mktemp("adaptive") / "val2014.h5"
    write_feature_file(path, coco_records(2, 12), **meta(id_policy={"rule": "path"}))
    return path


@pytest.fixture(scope="module")
def fixed36(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with --min-boxes 36 --max-boxes 36."""
    path = tmp_path_factory.mktemp("fixed") / "val2014.h5"
    write_feature_file(path, coco_records(36, 36), **meta(id_policy={"rule": "path"}))
    return path


def vqa_questions() -> list[dict[str, Any]]:
    """A VQA v2 questions list: integer image ids, as the official JSON has them."""
    return [{"image_id": i, "question_id": i * 1000 + 1, "question": "what?"} for i in COCO_IDS]


def spatial(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 0] / w + bw / w,
                     boxes[:, 1] / h + bh / h, bw / w, bh / h], axis=1)  # fmt: skip


def read_generate_tsv(path: Path) -> dict[int, dict[str, Any]]:
    """The generate_tsv readers' decode: int(image_id), float32 (num_boxes, -1)."""
    csv.field_size_limit(sys.maxsize)
    names = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
    out = {}
    with path.open() as fh:
        for item in csv.DictReader(fh, delimiter="\t", fieldnames=names):
            n = int(item["num_boxes"])
            image_id = int(item["image_id"])  # the call that fails on file-name ids
            out[image_id] = {
                "w": float(item["image_w"]),
                "h": float(item["image_h"]),
                "boxes": np.frombuffer(base64.b64decode(item["boxes"]), np.float32).reshape(n, -1),
                "features": np.frombuffer(base64.b64decode(item["features"]), np.float32)
                .reshape(n, -1),
            }  # fmt: skip
    return out


def test_bottom_up_attention_vqa(fixed36: Path, tmp_path: Path) -> None:
    want = stored(fixed36)
    rows = read_generate_tsv(export(fixed36, "tsv", tmp_path / "trainval_36.tsv"))
    assert set(rows) == set(COCO_IDS)  # converter: every id of the split is found
    for i, row in rows.items():
        np.testing.assert_array_equal(row["features"], want[i].features.astype(np.float32))
        np.testing.assert_array_equal(row["boxes"], want[i].boxes)
    out = export(fixed36, "h5-dense", tmp_path / "val36.hdf5")
    with (tmp_path / "val36_imgid2idx.pkl").open("rb") as fh:
        img_id2idx = pickle.load(fh)
    with h5py.File(out, "r") as hf:
        features = np.array(hf.get("image_features"))
        spatials = np.array(hf.get("spatial_features"))
    entries = [img_id2idx[q["image_id"]] for q in vqa_questions()]  # KeyError on a miss
    assert features.shape == (len(COCO_IDS), 36, 32) and spatials.shape[2] == 6
    for q, idx in zip(vqa_questions(), entries, strict=True):
        rec = want[q["image_id"]]
        np.testing.assert_array_equal(features[idx], rec.features.astype(np.float32))
        np.testing.assert_allclose(
            spatials[idx], spatial(rec.boxes, rec.image_w, rec.image_h), rtol=1e-6, atol=1e-6
        )


def test_ban_vqa_adaptive(adaptive: Path, tmp_path: Path) -> None:
    want = stored(adaptive)
    assert set(read_generate_tsv(export(adaptive, "tsv", tmp_path / "t.tsv"))) == set(COCO_IDS)
    out = export(adaptive, "h5-ragged", tmp_path / "val.hdf5")
    with (tmp_path / "val_imgid2idx.pkl").open("rb") as fh:
        img_id2idx = pickle.load(fh)
    with h5py.File(out, "r") as hf:
        features = np.array(hf.get("image_features"))
        pos_boxes = np.array(hf.get("pos_boxes"))
    for q in vqa_questions():
        image = img_id2idx[q["image_id"]]
        got = features[pos_boxes[image][0] : pos_boxes[image][1], :]
        rec = want[q["image_id"]]
        assert got.shape == (rec.num_boxes, 32)
        np.testing.assert_array_equal(got, rec.features.astype(np.float32))


def load_obj_tsv(path: Path) -> list[dict[str, Any]]:
    """LXMERT's decode of an obj36 TSV."""
    names = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
             "attrs_conf", "num_boxes", "boxes", "features"]  # fmt: skip
    csv.field_size_limit(sys.maxsize)
    data = []
    with path.open() as fh:
        for item in csv.DictReader(fh, names, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            n = item["num_boxes"]
            for key, shape, dtype in (
                ("objects_id", (n,), np.int64), ("objects_conf", (n,), np.float32),
                ("attrs_id", (n,), np.int64), ("attrs_conf", (n,), np.float32),
                ("boxes", (n, 4), np.float32), ("features", (n, -1), np.float32),
            ):  # fmt: skip
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            data.append(item)
    return data


def test_lxmert_keeps_every_question(adaptive: Path, tmp_path: Path) -> None:
    want = stored(adaptive)
    imgid2img = {
        d["img_id"]: d
        for d in load_obj_tsv(export(adaptive, "lxmert-tsv", tmp_path / "val2014_obj36.tsv"))
    }
    questions = [{"img_id": f"COCO_val2014_{i:012d}", "question_id": i} for i in COCO_IDS]
    kept = [q for q in questions if q["img_id"] in imgid2img]  # "Use %d data in torch dataset"
    assert len(kept) == len(questions)
    for q in kept:
        info, rec = imgid2img[q["img_id"]], want[q["question_id"]]
        assert (info["img_h"], info["img_w"]) == (rec.image_h, rec.image_w)
        np.testing.assert_array_equal(info["features"], rec.features.astype(np.float32))
        np.testing.assert_array_equal(info["objects_id"], rec.objects_id)
        boxes = info["boxes"].copy()
        boxes[:, (0, 2)] /= info["img_w"]
        boxes[:, (1, 3)] /= info["img_h"]
        np.testing.assert_array_less(boxes, 1 + 1e-5)  # LXMERT's own sanity check
        np.testing.assert_array_less(-boxes, 0 + 1e-5)


def test_self_critical_make_bu_data(adaptive: Path, tmp_path: Path) -> None:
    want = stored(adaptive)
    tsv = export(adaptive, "tsv", tmp_path / "karpathy_val_resnet101_faster_rcnn_genome.tsv")
    base = tmp_path / "cocobu"
    for suffix in ("_att", "_fc", "_box"):
        os.makedirs(f"{base}{suffix}")
    for image_id, item in read_generate_tsv(tsv).items():  # make_bu_data.py's loop
        np.savez_compressed(os.path.join(f"{base}_att", str(image_id)), feat=item["features"])
        np.save(os.path.join(f"{base}_fc", str(image_id)), item["features"].mean(0))
        np.save(os.path.join(f"{base}_box", str(image_id)), item["boxes"])
    for cocoid in COCO_IDS:  # the dataloader: str(cocoid) + '.npz' / '.npy'
        att = np.load(os.path.join(f"{base}_att", str(cocoid) + ".npz"))["feat"]
        box = np.load(os.path.join(f"{base}_box", str(cocoid) + ".npy"))
        rec = want[cocoid]
        np.testing.assert_array_equal(att, rec.features.astype(np.float32))
        np.testing.assert_array_equal(box, rec.boxes)


def test_mcan_and_openvqa(adaptive: Path, tmp_path: Path) -> None:
    want = stored(adaptive)
    out = export(adaptive, "npz-mcan", tmp_path / "val2014")
    paths = glob.glob(str(out) + "/*.npz")
    iid_to_path = {str(int(p.split("/")[-1].split("_")[-1].split(".")[0])): p for p in paths}
    for q in vqa_questions():
        iid = str(q["image_id"])  # load_ques_ans: str(ans['image_id'])
        x = np.load(iid_to_path[iid])["x"].transpose((1, 0))
        rec = want[q["image_id"]]
        np.testing.assert_array_equal(x, rec.features.astype(np.float32))
        padded = np.pad(x[:100], ((0, 100 - min(len(x), 100)), (0, 0)), mode="constant")
        assert padded.shape == (100, 32)  # what reaches their Linear(2048, ...) as (100, D)


def test_milvlg_writer_layout(adaptive: Path, tmp_path: Path) -> None:
    want = stored(adaptive)
    out = export(adaptive, "npz", tmp_path / "npz")
    for i in COCO_IDS:
        im_file = f"COCO_val2014_{i:012d}.jpg"
        with np.load(out / (im_file.split(".")[0] + ".npz"), allow_pickle=True) as data:
            rec = want[i]
            assert data["x"].shape == (rec.num_boxes, 32) and int(data["num_bbox"]) == rec.num_boxes
            np.testing.assert_array_equal(data["x"], rec.features.astype(np.float32))
            np.testing.assert_array_equal(data["bbox"], rec.boxes)
            assert (int(data["image_h"]), int(data["image_w"])) == (rec.image_h, rec.image_w)
            assert data["info"].item()["image_id"] == im_file.split(".")[0]


def max_protocol(path: Path) -> int:
    """The highest protocol among a pickle's opcodes (``pickletools``)."""
    ops = list(pickletools.genops(path.read_bytes()))
    assert ops[0][0].name == "PROTO"
    return max(op.proto for op, _, _ in ops)


def old_pythons() -> list[str]:
    """Working python2.7 / python3.6 interpreters on PATH or under pyenv, if any."""
    found = []
    for name in ("python2.7", "python3.6"):
        pyenv = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/*/bin/{name}")))
        for candidate in [shutil.which(name), *pyenv]:
            if (
                candidate
                and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0
            ):
                found.append(candidate)
                break
    return found


def test_pickles_open_in_python_2(adaptive: Path, tmp_path: Path) -> None:
    export(adaptive, "h5-ragged", tmp_path / "train.hdf5")
    pkl = tmp_path / "train_imgid2idx.pkl"
    assert pkl.read_bytes()[:2] == b"\x80\x02"  # PROTO 2
    assert max_protocol(pkl) <= 2
    interpreters = old_pythons()
    if not interpreters:
        pytest.skip("no python2.7 / python3.6 interpreter here; the opcode check above holds")
    code = f"import pickle; print(sorted(pickle.load(open({str(pkl)!r}, 'rb')).items()))"
    for python in interpreters:
        got = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
        assert got.stdout.strip().replace("L", "") == str(
            sorted((k, i) for i, k in enumerate(COCO_IDS))
        )
