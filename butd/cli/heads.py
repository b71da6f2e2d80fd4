"""``butd caption``, ``butd answer`` and ``butd heads train caption|vqa``.

Locally (``--model`` DIR): features come from a feature file (ragged HDF5 of ``butd.store.h5``)
given with ``--features``, or from a single-image MILVLG ``.npz`` passed in place of the image
id, and the head runs on ``--device`` (default cpu, as ``butd extract``). Otherwise the image
id is looked up in a running gateway (``--url``, default ``BUTD_URL``) through ``/v1/caption`` /
``/v1/vqa``: its workers' heads answer (on their own device). Torch is imported lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``caption``, ``answer`` and ``heads`` commands."""
    p = subparsers.add_parser("caption", help="caption one image from its stored region features")
    _source_args(p)
    p.add_argument("--beam", type=int, default=5, help="beam size (Up-Down: 5)")
    p.add_argument("--max-len", type=int, default=20, help="maximum caption length in words")
    p.set_defaults(handler=_caption)

    p = subparsers.add_parser("answer", help="answer a question about one image")
    _source_args(p)
    p.add_argument("question", help='the question, e.g. "what color is the bus?"')
    p.add_argument("--top", type=int, default=5, help="how many answers to print")
    p.set_defaults(handler=_answer)

    heads = subparsers.add_parser("heads", help="train caption / VQA heads").add_subparsers(
        dest="heads_cmd"
    )
    t = heads.add_parser("train", help="train a head on a feature file")
    t.add_argument("task", choices=("caption", "vqa"))
    t.add_argument("--features", required=True, type=Path, help="ragged HDF5 feature file")
    t.add_argument(
        "--annotations",
        required=True,
        type=Path,
        help="caption: Karpathy dataset_coco.json or COCO captions_*.json; vqa: VQA v2 annotations",
    )
    t.add_argument("--questions", type=Path, help="vqa: VQA v2 questions JSON")
    t.add_argument(
        "--out", required=True, type=Path, help="checkpoint directory (resumes from last.pt)"
    )
    t.add_argument(
        "--head",
        default=None,
        help="caption: updown|sat|adaptive|sca; vqa: updown|updown_relu|ban",
    )
    t.add_argument(
        "--grid",
        action="store_true",
        help="train on the file's grid features (butd extract --grid-size G) instead of regions",
    )
    t.add_argument(
        "--cbam",
        action="store_true",
        help="with --grid: refine the grid with CBAM before the head's attention (updown, sca, "
        "vqa updown)",
    )
    t.add_argument(
        "--recipe", default=None, help="optimiser recipe (butd.heads.train); default per head"
    )
    t.add_argument("--steps", type=int, default=60000, help="optimiser updates")
    t.add_argument("--batch-size", type=int, default=None, help="default per recipe")
    t.add_argument("--min-count", type=int, default=None, help="vocabulary / answer-set threshold")
    t.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="shrink every hidden size to this (attention: half); default: the paper's sizes",
    )
    t.add_argument(
        "--scst-steps", type=int, default=0, help="caption: CIDEr-D SCST updates after XE"
    )
    t.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1)")
    t.add_argument(
        "--note",
        default="",
        help="what this head is, stored in the checkpoint and returned "
        "with every answer (the demo heads: butd.heads.demo.DEMO_NOTE)",
    )
    t.add_argument(
        "--ds-lambda",
        type=float,
        default=1.0,
        help="sat: weight of the doubly stochastic penalty against the summed NLL (Xu et al.: "
        "1; 0 turns it off, which binds better over region sets: docs/heads.md)",
    )
    t.add_argument(
        "--sentinel-warmup",
        type=_fraction,
        default=0.5,
        help="adaptive: fraction of the updates trained without the visual sentinel first (0: "
        "jointly from the start as Lu et al., which collapses onto the sentinel: docs/heads.md)",
    )
    t.set_defaults(handler=_train)  # fmt: skip


def _fraction(text: str) -> float:
    """A number in [0, 1) (argparse type)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {text}")
    return value


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "image", help="image id (in --features, or in the gateway's store), or a .npz file"
    )
    p.add_argument(
        "--model",
        type=Path,
        help="checkpoint directory or .pt file (local, with --features/.npz; default: the "
        "packaged synthetic demo head)",
    )
    p.add_argument("--features", type=Path, help="ragged HDF5 feature file holding the image")
    p.add_argument(
        "--device", default="cpu", help="local --model: cpu, cuda or cuda:N (as butd extract)"
    )
    p.add_argument("--url", help="gateway to ask when no --features/.npz (default BUTD_URL)")
    p.add_argument("--namespace", help="the image id's namespace in the gateway (default)")
    p.add_argument("--sha256", action="store_true", help="IMAGE is a content hash (gateway)")


def _local(args: argparse.Namespace) -> bool:
    """True when the features are a local file (then ``--model`` is required)."""
    npz = args.image.endswith(".npz") and Path(args.image).is_file()
    if not (npz or args.features is not None):
        return False
    if args.model is None:
        from butd.heads.demo import DEMO_NOTE, demo_head

        args.model = demo_head("caption" if getattr(args, "question", None) is None else "vqa")
        logger.info("no --model: the packaged demo head %s (%s)", args.model, DEMO_NOTE)
    return True


def _gateway(args: argparse.Namespace) -> Any:
    from butd.client import Client
    from butd.service.settings import ClientSettings

    settings = ClientSettings()
    return Client(args.url or settings.url, settings.api_key, timeout=settings.timeout_s)


def _named(args: argparse.Namespace) -> dict[str, Any]:
    if args.sha256:
        return {"sha256": args.image}
    return {"image_id": args.image, "namespace": args.namespace}


def _ask(args: argparse.Namespace, task: str) -> int:
    """Ask the gateway; print its JSON answer (attention and boxes left out)."""
    import httpx

    from butd.client import ButdError

    with _gateway(args) as client:
        try:
            if task == "caption":
                out = client.caption(**_named(args), beam_size=args.beam, max_len=args.max_len)
            else:
                out = client.answer(args.question, **_named(args), top=args.top)
        except (ButdError, httpx.HTTPError) as exc:
            command = "caption" if task == "caption" else "answer"
            raise SystemExit(f"butd {command}: {exc}") from None
    drop = {"attention", "boxes"}
    print(json.dumps({k: v for k, v in out.items() if k not in drop}))
    return 0


def _record(args: argparse.Namespace) -> Any:
    if args.image.endswith(".npz") and Path(args.image).is_file():
        from butd.store.readers import read_npz

        return read_npz(args.image)
    from butd.store.h5 import FeatureFile
    from butd.store.image_ids import join_ids

    if not Path(args.features).is_file():
        raise SystemExit(f"no feature file {args.features} (written by butd extract)")
    with FeatureFile(args.features) as ff:
        if args.image in ff:
            return ff.get(args.image)
        joined = join_ids([args.image], ff.ids(), ff.id_policy.get("rule", ""))
        if not joined.matched:
            where = str(args.features)
            raise SystemExit(f"image id {args.image!r} is not in {where}: {joined.summary(where)}")
        return ff.get(joined.matched[args.image])


def _caption(args: argparse.Namespace) -> int:
    if not _local(args):
        return _ask(args, "caption")
    from butd.heads.inference import caption, load_head

    record = _record(args)
    model, meta = load_head(args.model, device=args.device)
    res = caption(model, meta, record, args.beam, args.max_len)  # type: ignore[arg-type]
    out = {"image_id": args.image, "caption": " ".join(res.words), "log_prob": res.log_prob}
    print(json.dumps({**out, "note": meta.get("note", "")}))
    return 0


def _answer(args: argparse.Namespace) -> int:
    if not _local(args):
        return _ask(args, "vqa")
    from butd.heads.inference import answer, load_head

    record = _record(args)
    model, meta = load_head(args.model, device=args.device)
    res = answer(model, meta, record, args.question, args.top)
    out = {"image_id": args.image, "question": args.question, "answers": res.answers}
    print(json.dumps({**out, "note": meta.get("note", "")}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from butd.heads.cli_train import train_caption, train_vqa

    if args.task == "vqa":
        if args.questions is None:
            raise SystemExit("vqa training needs --questions")
        train_vqa(args)
    else:
        train_caption(args)
    return 0
