"""Short, human-readable renderings of gateway answers for the ``butd`` commands.

Each fits a terminal screen: a header line, at most ``SHOWN`` detail lines, and a line saying
how to get the rest (``--json`` or ``--out``).
"""

from __future__ import annotations

from typing import Any

# Detail lines (regions, failed images) printed before "... N more".
SHOWN = 10


def _more(total: int, hint: str) -> list[str]:
    return [f"  ... {total - SHOWN} more ({hint})"] if total > SHOWN else []


def created_summary(created: dict[str, Any]) -> str:
    """``job ID queued: N images in S shard(s)`` and the files passed over."""
    skipped = created.get("skipped") or []
    lines = [
        f"job {created['job_id']} queued: {created['total']} images in "
        f"{created.get('shards', '?')} shard(s)"
        + (f", {len(skipped)} file(s) passed over (not images)" if skipped else "")
    ]
    lines += [f"  passed over {s['image_id']}: {s['reason']}" for s in skipped[:SHOWN]]
    lines += _more(len(skipped), "--json lists them all")
    return "\n".join(lines)


def status_summary(status: dict[str, Any]) -> str:
    """``job ID: STATE, D of T images done, F failed`` and the first failures."""
    errors = status.get("errors") or []
    namespace = status.get("namespace")
    head = (
        f"job {status['job_id']}: {status['state']}, {status['done']} of {status['total']} "
        f"images done, {status['failed']} failed"
        + (f" (namespace {namespace})" if namespace else "")
    )
    lines = [head]
    lines += [f"  failed {e['image_id']}: {e['reason']}" for e in errors[:SHOWN]]
    lines += _more(len(errors), "butd jobs status JOB_ID --json lists them all")
    if status["state"] == "done":
        job = status["job_id"]
        lines.append(f"  download: butd jobs export {job} --format h5-ragged --out FILE")
    return "\n".join(lines)


def record_summary(regions: dict[str, Any]) -> str:
    """One image's regions: a header, then the ``SHOWN`` most confident regions."""
    feats = regions["features"]
    n = int(regions.get("num_boxes", len(regions["boxes"])))
    lines = [
        f"{regions['image_id']} ({regions.get('namespace') or 'default'}): {n} regions, "
        f"features {'x'.join(map(str, feats.shape))} {feats.dtype}, image "
        f"{regions['image_w']}x{regions['image_h']}, model {regions['model_version']}, "
        f"sha256 {str(regions['sha256'])[:12]}...",
    ]
    if "grid" in regions:
        grid = regions["grid"]
        lines[0] += f", grid {'x'.join(map(str, grid.shape))} {grid.dtype}"
    lines.append("  conf  attribute object          box x1,y1,x2,y2")
    order = sorted(range(n), key=lambda i: -float(regions["objects_conf"][i]))
    for i in order[:SHOWN]:
        label = f"{_name(regions, 'attributes', i)} {_name(regions, 'objects', i)}"
        box = ",".join(f"{v:.0f}" for v in regions["boxes"][i])
        lines.append(f"  {float(regions['objects_conf'][i]):.2f}  {label:<26} {box}")
    lines += _more(n, "--out FILE.npz saves every region, --json prints them")
    return "\n".join(lines)


def _name(regions: dict[str, Any], key: str, i: int) -> str:
    names = regions.get(key)
    if names is not None and i < len(names):
        return str(names[i])
    ids = regions["objects_id" if key == "objects" else "attrs_id"]
    return f"#{int(ids[i])}"
