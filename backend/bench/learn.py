"""`sam-backend bench learn`: does the refinement head learn, and does the gate keep regressions out?

Corrections arrive in rounds (10, 25, 50, 100 by default, cumulative) as Label Studio brush
annotations on a synthetic domain whose base mask bleeds into shadows and misses thin parts
(model/synthetic_domain.py: a controlled stand-in for SAM's output, since no SAM weights can be
had here). Each round runs the production path: annotations -> corrections -> candidate head ->
held-out evaluation of base, served head and candidate -> gate -> registry.
"""

from __future__ import annotations

import tempfile

import torch

from backend.labelstudio.corrections import task_objects
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.rle import mask_to_rle
from model.registry import HeadRegistry
from model.synthetic_domain import ShadowBleedBase, make_scene
from model.train import Correction, Segmenter, TrainConfig, evaluate, train_and_gate

PROJECT = 1
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
</View>"""


def annotated_task(task_id: int, mask) -> dict:
    """A task as Label Studio returns it after an annotator submitted a brush mask."""
    height, width = mask.shape
    region = {"id": f"r{task_id}", "from_name": "brush", "to_name": "image", "type": "brushlabels",
              "original_width": width, "original_height": height, "image_rotation": 0,
              "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Object"]}}
    return {"id": task_id, "data": {"image": f"/data/upload/1/scene-{task_id}.png"},
            "annotations": [{"id": task_id, "result": [region], "was_cancelled": False,
                             "updated_at": "2026-11-23T00:00:00Z"}], "predictions": []}


def corrections(first_id: int, count: int, config) -> list[Correction]:
    found = []
    for task_id in range(first_id, first_id + count):
        scene = make_scene(task_id)
        for obj in task_objects(annotated_task(task_id, scene.gt), config):
            found.append(Correction(task_id, scene.image, obj.mask, scene.features, obj.label))
    return found


def run_learn_bench(args) -> dict:
    torch.manual_seed(args.seed)
    rounds = [int(r) for r in args.rounds.split(",")]
    config = parse_label_config(CONFIG)
    base = ShadowBleedBase()
    heldout = corrections(1_000_000 + args.seed * 10_000, args.heldout, config)
    pool = corrections(args.seed * 10_000, max(rounds), config)
    base_metrics = evaluate(heldout, Segmenter(base, None))
    rows, regression = [], False
    with tempfile.TemporaryDirectory() as tmp:
        registry = HeadRegistry(tmp)
        served = None
        for count in rounds:
            outcome = train_and_gate(pool[:count], heldout, base, served,
                                     TrainConfig(steps=args.steps, seed=args.seed), args.margin)
            m = outcome.metrics
            if outcome.promoted:
                # checked here independently of the gate: a promoted head must not be worse anywhere we measure
                regression |= (m["candidate"]["miou"] < m["served"]["miou"] or m["candidate"]["noc90"] > m["served"]["noc90"]
                               or m["candidate"]["noc85"] > m["served"]["noc85"])
                saved = registry.save(PROJECT, outcome.head, {"base_model_id": "stand-in", "metrics": m,
                                                              "status": "promoted", "reason": outcome.reason})
                registry.set_current(PROJECT, saved.version, outcome.reason)
                served = registry.load(PROJECT, saved.version, "stand-in")  # what a serving worker would load
            after = m["candidate"] if outcome.promoted else m["served"]
            rows.append({"corrections": count, "samples": outcome.samples, "train_seconds": round(outcome.train_seconds, 1),
                         "promoted": bool(outcome.promoted), "reason": outcome.reason,
                         "served_before": _short(m["served"]), "candidate": _short(m["candidate"]),
                         "served_after": _short(after)})
    at_50 = next((r for r in rows if r["corrections"] >= 50), rows[-1])
    gain = at_50["served_after"]["miou"] - base_metrics["miou"]
    noc_drop = 1 - at_50["served_after"]["noc90"] / base_metrics["noc90"] if base_metrics["noc90"] else 0.0
    return {"bench": "learn", "heldout_objects": len(heldout), "steps": args.steps, "margin": args.margin,
            "threads": torch.get_num_threads(), "base": _short(base_metrics), "rounds": rows,
            "at_50": {"corrections": at_50["corrections"], "miou_gain_points": round(float(gain), 2),
                      "noc90_reduction": round(float(noc_drop), 3),
                      "target_met": bool(gain >= 5 and noc_drop >= 0.2)},
            "never_promoted_regression": not bool(regression)}


def _short(m: dict) -> dict:
    return {k: round(float(m[k]), 2) for k in ("miou", "miou_click", "miou_box", "boundary_iou", "noc85", "noc90")}


def print_learn_table(f: dict) -> None:
    b = f["base"]
    print(f"refinement head on a shadow-bleed / thin-part domain, {f['heldout_objects']} held-out objects, "
          f"{f['steps']} steps per round, margin {f['margin']} mIoU points")
    print(f"base (stand-in SAM): mIoU {b['miou']:.1f} (1 click {b['miou_click']:.1f}, box {b['miou_box']:.1f}), "
          f"boundary IoU {b['boundary_iou']:.1f}, NoC@85 {b['noc85']:.2f}, NoC@90 {b['noc90']:.2f}")
    print(f"{'corr':>5} {'samples':>7} {'train s':>8} {'cand mIoU':>9} {'cand NoC90':>10} {'verdict':>8} "
          f"{'served mIoU':>11} {'vs base':>8} {'served NoC90':>12} {'vs base':>8}")
    for r in f["rounds"]:
        s, c = r["served_after"], r["candidate"]
        print(f"{r['corrections']:5d} {r['samples']:7d} {r['train_seconds']:8.1f} {c['miou']:9.1f} {c['noc90']:10.2f} "
              f"{'promote' if r['promoted'] else 'reject':>8} {s['miou']:11.1f} {s['miou'] - b['miou']:+8.1f} "
              f"{s['noc90']:12.2f} {(s['noc90'] / b['noc90'] - 1) * 100 if b['noc90'] else 0:+7.0f}%")
    a = f["at_50"]
    print(f"after {a['corrections']} corrections: {a['miou_gain_points']:+.1f} mIoU points, NoC@90 "
          f"{a['noc90_reduction'] * 100:.0f}% lower than base (target +5 points and 20%: "
          f"{'met' if a['target_met'] else 'NOT met'}); promoted regressions: "
          f"{'none' if f['never_promoted_regression'] else 'YES'}")
