"""Segment everything: the full prompt grid against the coarse-to-fine search (model.automatic), for
`sam-backend bench prelabel`.

No real SAM weights exist here, and random weights accept no mask at SAM's thresholds, so which
objects a search finds is measured with a stand-in decoder behind the model's `decode` interface,
on synthetic scenes whose objects are known: a click answers the segment under it (its coverage of
each cell of the 256x256 low-res grid, as logits). A scene is a wall, a floor, a table with objects
on it, a patch of clutter the stand-in is unsure of (a low IoU estimate, so SAM's filter rejects it,
as SAM does on texture), and 10-24 objects from 6 to 110 px across, some below the minimum area.
The cost of a search is then timed with the real vit_b decoder (random weights) decoding every
prompt the search sends, while the stand-in's answers steer it: the real decoder's seconds for the
prompts a search needs on such a scene.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import cv2
import numpy as np

from model.automatic import AutomaticConfig, search_everything
from model.prompts import ModelPrompt
from model.sam import IMAGE_SIZE

LOW_RES = 256
LOGIT_GAIN = 20.0  # coverage 0 -> -10, 1 -> +10
SURE, UNSURE = 0.95, 0.5  # the stand-in's IoU estimates: accepted / rejected by SAM's 0.86 filter
WALL, FLOOR, TABLE, CLUTTER = 1, 2, 3, 4
FIRST_OBJECT = 5


@dataclasses.dataclass
class Scene:
    labels: np.ndarray  # int32 at encoder-input size: every pixel's segment
    objects: list[int]  # the labels that are objects (not wall, floor, table, clutter)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.labels.shape

    def object_masks(self, min_area: int = 0) -> list[np.ndarray]:
        masks = [self.labels == label for label in self.objects]
        return [m for m in masks if m.sum() >= min_area]


def make_scene(seed: int, input_size: tuple[int, int] = (768, 1024)) -> Scene:
    rng = np.random.default_rng(seed)
    h, w = input_size
    labels = np.full((h, w), WALL, np.int32)
    labels[int(h * rng.uniform(0.35, 0.55)):] = FLOOR
    tx0, tx1 = int(w * rng.uniform(0.05, 0.3)), int(w * rng.uniform(0.6, 0.95))
    ty0, ty1 = int(h * rng.uniform(0.4, 0.55)), int(h * rng.uniform(0.75, 0.95))
    labels[ty0:ty1, tx0:tx1] = TABLE
    cx, cy = int(rng.uniform(0, w - 200)), int(rng.uniform(0, h * 0.3))
    labels[cy:cy + int(rng.uniform(80, 160)), cx:cx + int(rng.uniform(120, 220))] = CLUTTER
    free = np.ones((h, w), bool)
    objects = []
    for k in range(int(rng.integers(10, 25))):
        radius = float(np.exp(rng.uniform(np.log(3), np.log(55))))
        on_table = k % 3 == 0  # objects inside the table's outline: nested in a larger segment
        for _ in range(30):
            x = rng.uniform(tx0 + radius, tx1 - radius) if on_table else rng.uniform(radius, w - radius)
            y = rng.uniform(ty0 + radius, ty1 - radius) if on_table else rng.uniform(radius, h - radius)
            shape = np.zeros((h, w), np.uint8)
            axes = (max(int(radius * rng.uniform(0.6, 1.0)), 2), max(int(radius), 2))
            cv2.ellipse(shape, (int(x), int(y)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            shape = shape.astype(bool)
            if (shape & ~free).any() or not shape.any():
                continue
            label = FIRST_OBJECT + len(objects)
            labels[shape] = label
            objects.append(label)
            free &= ~cv2.dilate(shape.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
            break
    return Scene(labels, objects)


def _low_res(mask: np.ndarray) -> np.ndarray:
    """A mask at encoder-input size -> logits of its coverage of each cell of the padded 256 grid."""
    padded = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    coverage = cv2.resize(padded, (LOW_RES, LOW_RES), interpolation=cv2.INTER_AREA)
    return ((coverage - 0.5) * LOGIT_GAIN).astype(np.float32)


class SceneDecoder:
    """STAND-IN for SAM's decoder on a Scene (`features` is the scene's label map): a click answers
    the segment under it, sure of it except on clutter. `masks_for` gives SAM's multimask shape: the
    segment, and the segment with its holes filled (a table with what stands on it).

    With `timed_by=(model, features)` every prompt is also decoded by that real model, answer
    discarded: the real decoder's cost, the stand-in's answers."""

    def __init__(self, timed_by=None):
        self.timed_by = timed_by
        self.prompts = 0
        self._cache: dict[tuple[int, bool], np.ndarray] = {}
        self._labels_id = None

    def _segment(self, labels: np.ndarray, label: int, filled: bool) -> np.ndarray:
        if self._labels_id != id(labels):
            self._cache.clear()
            self._labels_id = id(labels)
        key = (label, filled)
        if key not in self._cache:
            mask = (labels == label).astype(np.uint8)
            if filled:
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                mask = cv2.drawContours(np.zeros_like(mask), contours, -1, 1, -1)
            self._cache[key] = _low_res(mask.astype(bool))
        return self._cache[key]

    def _label_at(self, labels: np.ndarray, point) -> int:
        x, y = point
        return int(labels[min(int(y), labels.shape[0] - 1), min(int(x), labels.shape[1] - 1)])

    def decode(self, features: np.ndarray, prompt: ModelPrompt, input_size=None) -> tuple[np.ndarray, float]:
        self.prompts += 1
        if self.timed_by is not None:
            model, real_features = self.timed_by
            model.decode(real_features, prompt, input_size)
        label = self._label_at(features, prompt.points[0])
        return self._segment(features, label, False), (UNSURE if label == CLUTTER else SURE)

    def masks_for(self, features: np.ndarray, points: np.ndarray, crop: tuple[int, int]):
        """A batched PointDecoder answer (model.automatic): two masks a point, (N, 2, h, w) and (N, 2)."""
        self.prompts += len(points)
        logits, scores = [], []
        for point in points:
            label = self._label_at(features, point)
            logits.append([self._segment(features, label, filled)[: crop[0], : crop[1]] for filled in (False, True)])
            scores.append([UNSURE if label == CLUTTER else SURE] * 2)
        return np.array(logits, dtype=np.float32), np.array(scores, dtype=np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def matched(found: list[np.ndarray], wanted: list[np.ndarray], threshold: float = 0.5) -> int:
    """How many of `wanted` some mask of `found` covers with IoU >= threshold."""
    return sum(any(iou(f, w) >= threshold for f in found) for w in wanted)


def compare_on_scenes(scenes: int, points_per_side: int, min_area_fraction: float, seed: int = 0) -> dict:
    """Objects found and prompts sent by each search on the stand-in's scenes."""
    rows = []
    for s in range(scenes):
        scene = make_scene(seed + s)
        h, w = scene.input_size
        truth = scene.object_masks(int(np.ceil(min_area_fraction * h * w)))
        found = {}
        for search in ("grid", "coarse"):
            config = AutomaticConfig(points_per_side=points_per_side, min_area_fraction=min_area_fraction, search=search)
            result = search_everything(SceneDecoder(), scene.labels, scene.input_size, config)
            found[search] = ([o.logits > 0 for o in result.objects], result.prompts)
        grid, coarse = found["grid"][0], found["coarse"][0]
        rows.append({
            "scene": seed + s, "objects_above_min_area": len(truth),
            "grid_prompts": found["grid"][1], "coarse_prompts": found["coarse"][1],
            "grid_found": len(grid), "coarse_found": len(coarse),
            "grid_objects_coarse_finds": matched(coarse, grid), "coarse_objects_grid_lacks": len(coarse) - matched(grid, coarse),
            "truth_grid_finds": matched(grid, truth), "truth_coarse_finds": matched(coarse, truth),
        })
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "scene"}
    return {"scenes": rows, "total": total}


def time_on_real_decoder(model, features: np.ndarray, scenes: int, points_per_side: int,
                         min_area_fraction: float, seed: int = 0) -> dict:
    """Seconds per image of each search with the real decoder decoding every prompt it sends (the
    stand-in's answers steer it; see the module docstring)."""
    seconds = {"grid": [], "coarse": []}
    prompts = {"grid": [], "coarse": []}
    for s in range(scenes):  # both searches on each scene in turn: the machine's load hits both alike
        scene = make_scene(seed + s)
        for search in ("grid", "coarse"):
            config = AutomaticConfig(points_per_side=points_per_side, min_area_fraction=min_area_fraction, search=search)
            decoder = SceneDecoder(timed_by=(model, features))
            start = time.perf_counter()
            result = search_everything(decoder, scene.labels, scene.input_size, config)
            seconds[search].append(time.perf_counter() - start)
            prompts[search].append(result.prompts)
    return {search: {"prompts_per_image": statistics.mean(prompts[search]),
                     "seconds_per_image": round(statistics.median(seconds[search]), 2),
                     "ms_per_prompt": round(1000 * sum(seconds[search]) / sum(prompts[search]), 1)}
            for search in ("grid", "coarse")}

def run_everything_figures(checkpoint: str, work, args) -> dict:
    """The bench's segment-everything section: objects and prompts on the stand-in's scenes, then
    seconds per image with the real decoder (loaded as the workers load it: ONNX Runtime on a CPU)."""
    from pathlib import Path

    from backend.bench.click import synthetic_jpeg
    from backend.pipeline.images import decode_image
    from model.sam import SamModel

    min_area = args.min_area / 100
    print(f"segment everything: full grid vs coarse search on {args.everything_scenes} stand-in scenes ...", flush=True)
    found = compare_on_scenes(args.everything_scenes, args.points_per_side, min_area)
    figures = {"points_per_side": args.points_per_side, "min_area_percent": args.min_area, "stand_in": found}
    if args.timed_scenes:
        model = SamModel.load(Path(checkpoint), "0" * 64, args.device, onnx_dir=Path(work) / "onnx",
                              threads=args.threads)
        image = decode_image(synthetic_jpeg((args.width, args.height), seed=0), 10**9)
        features = model.encode(image.input_image)  # the decoder's cost does not depend on what it is
        print(f"timing both searches with the real decoder on {args.timed_scenes} scenes ...", flush=True)
        figures["real_decoder"] = {"decoder": "onnxruntime" if model.onnx is not None else f"torch ({model.device})",
                                   **time_on_real_decoder(model, features, args.timed_scenes, args.points_per_side,
                                                          min_area)}
    return figures


def print_everything_table(figures: dict) -> None:
    n = figures["points_per_side"]
    total = figures["stand_in"]["total"]
    print()
    print(f"segment everything, {n}x{n} grid vs coarse search, minimum area {figures['min_area_percent']} % "
          f"(STAND-IN decoder: a click answers the segment under it, on synthetic scenes of known objects)")
    header = f"{'scene':>5} {'objects':>7} {'grid prompts':>12} {'coarse prompts':>14} {'grid found':>10} " \
             f"{'coarse found':>12} {'grid objs coarse finds':>22} {'truth grid/coarse':>17}"
    print(header)
    print("-" * len(header))
    for r in figures["stand_in"]["scenes"] + [dict(total, scene="all")]:
        print(f"{r['scene']:>5} {r['objects_above_min_area']:>7} {r['grid_prompts']:>12} {r['coarse_prompts']:>14} "
              f"{r['grid_found']:>10} {r['coarse_found']:>12} {r['grid_objects_coarse_finds']:>22} "
              f"{str(r['truth_grid_finds']) + '/' + str(r['truth_coarse_finds']):>17}")
    real = figures.get("real_decoder")
    if real:
        print(f"real decoder ({real['decoder']}, random weights) decoding every prompt each search sends:")
        for kind in ("grid", "coarse"):
            r = real[kind]
            print(f"  {kind:>6}: {r['prompts_per_image']:.0f} prompts, {r['seconds_per_image']:.2f} s/image, "
                  f"{r['ms_per_prompt']:.0f} ms/prompt")
        print(f"  coarse is {real['grid']['seconds_per_image'] / max(real['coarse']['seconds_per_image'], 1e-9):.1f}x "
              f"faster per image")
