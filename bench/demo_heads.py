"""Score the packaged demo heads (heads/demo) on held-out synthetic scenes.

    butd synth --out data/synth-val --images 40 --seed 4
    butd extract data/synth-val/images --out data/synth-val.h5
    python -m bench.demo_heads --data data/synth-val --features data/synth-val.h5

Prints the official VQA accuracy (per question type) and the mean CIDEr-D of the beam-3 captions
against each scene's 5 references (document frequencies from those references). The ids of the
annotations ("1") are joined to the stored ones ("000001.jpg") as ``butd heads train`` does.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from butd.heads.data import read_coco_captions, read_vqa
from butd.heads.demo import demo_head
from butd.heads.inference import answer, caption, load_head
from butd.heads.metrics.captions import CiderD
from butd.heads.metrics.vqa_accuracy import vqa_accuracy
from butd.heads.vocab import tokenize_caption
from butd.store.h5 import FeatureFile
from butd.store.image_ids import join_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a butd synth directory")
    parser.add_argument("--features", type=Path, required=True, help="butd extract of its images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with FeatureFile(args.features) as ff:
        questions = read_vqa(args.data / "vqa_questions.json", args.data / "vqa_annotations.json")
        captions = read_coco_captions(args.data / "captions.json")
        ids = join_ids([q.image_id for q in questions] + [c.image_id for c in captions], ff.ids())
        model, meta = load_head(demo_head("vqa"))
        by_type: dict[str, list[float]] = defaultdict(list)
        for q in questions:
            record = ff.get(ids.matched[q.image_id])
            best = answer(model, meta, record, q.question, top=1).answers[0][0]
            by_type[q.answer_type or "all"].append(vqa_accuracy(best, q.answers))
        model, meta = load_head(demo_head("caption"))
        refs = [[" ".join(tokenize_caption(c)) for c in item.captions] for item in captions]
        cider = CiderD(refs)
        scores = []
        for item, ref in zip(captions, refs, strict=True):
            got = caption(model, meta, ff.get(ids.matched[item.image_id]), beam_size=3)
            scores.append(cider.score(" ".join(got.words), ref))
    every = [a for accs in by_type.values() for a in accs]
    result = {
        "questions": len(every),
        "vqa_accuracy": round(100 * sum(every) / len(every), 1),
        "by_type": {t: round(100 * sum(a) / len(a), 1) for t, a in sorted(by_type.items())},
        "images": len(scores),
        "cider_d": round(sum(scores) / len(scores), 3),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
