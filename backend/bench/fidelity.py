"""`sam-backend bench fidelity`: how close to the pixel can our geometry bring a mask on 20 MP photos?

No real SAM weights exist here, and random weights segment nothing, so the masks are made by a
stand-in behind the model's interface (embed a window, decode a prompt there): for whatever window
it is given it returns the ground truth's coverage of each cell of its 256x256 answer grid, as
logits (coverage 0.5 is logit 0). That is the best answer any SAM could give on that grid: the
figures are the ceiling our geometry allows, not what a given checkpoint reaches.

Two paths are compared on the same synthetic screens (backend.bench.screens), prompts and stand-in:
- whole: today's output path on the whole-image answer (logits linearly to the encoder input,
  linearly to full resolution, threshold);
- zoom: model.zoom.answer, the production zoom path (windows, tracing, edges, paste-back, merge).
Prompts: one click at each defect's deepest interior point, and its bounding box.

Then, with the real vit_b architecture (random weights) through the real HTTP stack, the zoom
path's warm and cold click latency at 20 MP (see `time_zoom_clicks`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import cv2
import numpy as np

from backend.bench.screens import KINDS, Defect, Screen, make_screen
from model.interactive import _inner_boundary, iou
from model.prompts import Prompt
from model.windows import Window
from model.zoom import PATH_WHOLE, PixelPrompt, ZoomConfig, answer

LOW_RES = 256
LOGIT_GAIN = 20.0  # coverage 0 -> -10, 1 -> +10: SAM's logits span about that


class GroundTruthModel:
    """The stand-in decoder for one defect: a window's 'embedding' is the defect's exact coverage of
    each cell of the window's low-res grid (the grid spans the padded encoder-input square, so cells
    past the window's pixels are padding, seen as background); decoding returns it as logits
    whatever the prompt says."""

    def __init__(self, defect: Defect, input_side: int, low_res: int = LOW_RES):
        self.defect = defect
        self.input_side = input_side
        self.low_res = low_res
        mask = defect.mask.astype(np.float64)
        self.sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
        self.sat[1:, 1:] = mask.cumsum(0).cumsum(1)
        self.embedded: list[Window] = []

    def coverage(self, window: Window) -> np.ndarray:
        sx, sy = window.scale
        cell = self.input_side / self.low_res  # encoder-input pixels per cell
        edges = np.arange(self.low_res + 1) * cell
        xs = np.clip(window.x0 + edges / sx, window.x0, window.x1)  # padding holds no pixels
        ys = np.clip(window.y0 + edges / sy, window.y0, window.y1)
        area = (cell / sx) * (cell / sy)
        s = self._sat_at(ys, xs)
        return (s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]) / area

    def _sat_at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """The defect's area in [0, x) x [0, y) for every pair: exact, since the summed-area table is
        bilinear inside each pixel."""
        h, w = self.defect.mask.shape

        def weights(values, origin, size):
            local = np.clip(values - origin, 0, size)
            low = np.minimum(np.floor(local).astype(int), size - 1)
            return low, local - low

        yl, fy = weights(ys, self.defect.y0, h)
        xl, fx = weights(xs, self.defect.x0, w)
        rows = self.sat[yl] * (1 - fy)[:, None] + self.sat[yl + 1] * fy[:, None]
        return rows[:, xl] * (1 - fx) + rows[:, xl + 1] * fx

    def embed(self, window: Window) -> np.ndarray:
        self.embedded.append(window)
        return ((self.coverage(window) - 0.5) * LOGIT_GAIN).astype(np.float32)

    @staticmethod
    def decode(embedding: np.ndarray, prompt) -> tuple[np.ndarray, float]:
        return embedding, 1.0


def today_whole_mask(low_res: np.ndarray, whole: Window) -> np.ndarray:
    """Today's output path (model.masks at input side 1024): low-res logits linearly to the padded
    input square, cropped, linearly to full resolution, threshold."""
    side = whole.input_side
    in_h, in_w = whole.input_size
    up = cv2.resize(low_res, (side, side), interpolation=cv2.INTER_LINEAR)[:in_h, :in_w]
    return cv2.resize(up, (whole.width, whole.height), interpolation=cv2.INTER_LINEAR) > 0


def _bbox(mask: np.ndarray):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclasses.dataclass
class Score:
    iou: float
    boundary_iou: float
    recall: float
    line_recall: float | None


def score(pred: np.ndarray, defect: Defect, band: int = 2) -> Score:
    """IoU, boundary IoU (the bands `band` px inside each contour), pixel recall and, for thin
    defects, the share of the centreline covered; computed on the union of the boxes plus a margin."""
    height, width = pred.shape
    gx0, gy0, gx1, gy1 = defect.rect
    box = _bbox(pred)
    x0, y0, x1, y1 = (gx0, gy0, gx1, gy1) if box is None else (
        min(gx0, box[0]), min(gy0, box[1]), max(gx1, box[2]), max(gy1, box[3]))
    x0, y0, x1, y1 = max(x0 - 4, 0), max(y0 - 4, 0), min(x1 + 4, width), min(y1 + 4, height)
    p = pred[y0:y1, x0:x1]
    g = np.zeros_like(p)
    g[gy0 - y0:gy1 - y0, gx0 - x0:gx1 - x0] = defect.mask
    line = None
    if defect.centreline is not None:
        pts = np.floor(defect.centreline).astype(int)
        line = float(p[pts[:, 1] - y0, pts[:, 0] - x0].mean())
    recall = float(np.count_nonzero(p & g) / max(np.count_nonzero(g), 1))
    return Score(iou(p, g), iou(_inner_boundary(p, band), _inner_boundary(g, band)), recall, line)


def prompts_for(defect: Defect) -> dict[str, PixelPrompt]:
    x, y = defect.deepest_point()
    return {
        "click": PixelPrompt(np.array([[x, y]]), np.array([1]), None),
        "box": PixelPrompt(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.array(defect.box)),
    }


def run_ceiling(screens: list[Screen], input_side: int, config: ZoomConfig, out=None) -> list[dict]:
    """Every defect x prompt through both paths; one row each."""
    rows = []
    for screen in screens:
        whole = Window.whole(screen.size, input_side)
        for defect in screen.defects:
            model = GroundTruthModel(defect, input_side)
            whole_low = (model.coverage(whole).astype(np.float32) - 0.5) * LOGIT_GAIN
            whole_pred = today_whole_mask(whole_low, whole)
            for prompt_name, prompt in prompts_for(defect).items():
                model.embedded = []
                start = time.perf_counter()
                found = answer(prompt, screen.size, input_side, config, model.embed, model.decode,
                               lambda: (whole_low, 1.0))
                zoom_pred = whole_pred if found.path == PATH_WHOLE else found.mask
                elapsed = time.perf_counter() - start
                for path, pred in (("whole", whole_pred), ("zoom", zoom_pred)):
                    s = score(pred, defect)
                    rows.append({"screen": screen.seed, "kind": defect.kind, "defect": defect.name,
                                 "prompt": prompt_name, "path": path, "iou": s.iou, "boundary_iou": s.boundary_iou,
                                 "recall": s.recall, "line_recall": s.line_recall,
                                 "windows": len(set(model.embedded)) if path == "zoom" else 0,
                                 "zoom_path": found.path if path == "zoom" else "whole",
                                 "levels": sorted({w.side for w in found.windows}) if path == "zoom" else [],
                                 "seconds": elapsed if path == "zoom" else 0.0})
                if out is not None:
                    z = rows[-1]
                    print(f"  screen {screen.seed} {defect.name:<12} {prompt_name:<5} whole IoU {rows[-2]['iou']:.3f}"
                          f" -> zoom {z['iou']:.3f} (boundary {rows[-2]['boundary_iou']:.3f} -> {z['boundary_iou']:.3f},"
                          f" {z['zoom_path']}, {z['windows']} windows of {z['levels']} px)", file=out, flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per path and defect kind: means over defects and both prompts, and per prompt."""
    out: dict = {}
    for path in ("whole", "zoom"):
        out[path] = {}
        for kind in KINDS:
            mine = [r for r in rows if r["path"] == path and r["kind"] == kind]
            if not mine:
                continue
            entry = _means(mine)
            for prompt in ("click", "box"):
                entry[prompt] = _means([r for r in mine if r["prompt"] == prompt])
            if kind == "scratch":
                entry["by_defect"] = {name: _means([r for r in mine if r["defect"] == name])
                                      for name in sorted({r["defect"] for r in mine})}
            out[path][kind] = entry
    return out


def _means(rows: list[dict]) -> dict:
    lines = [r["line_recall"] for r in rows if r["line_recall"] is not None]
    entry = {"iou": round(statistics.mean(r["iou"] for r in rows), 4),
             "boundary_iou": round(statistics.mean(r["boundary_iou"] for r in rows), 4),
             "recall": round(statistics.mean(r["recall"] for r in rows), 4),
             "windows": round(statistics.mean(r["windows"] for r in rows), 1),
             "n": len(rows)}
    if lines:
        entry["line_recall"] = round(statistics.mean(lines), 4)
    return entry


TARGETS = {  # (kind, metric, minimum, which defects): the ceiling targets for the zoom path
    "scratch_3px_iou": ("scratch_3px", "iou", 0.90),
    "crack_iou": ("crack", "iou", 0.85),
    "pit_iou": ("pit", "iou", 0.95),
    "blemish_iou": ("blemish", "iou", 0.95),
    "large_boundary_iou": ("large", "boundary_iou", 0.80),
}


def check_targets(rows: list[dict]) -> dict:
    """Each target on the zoom path, per prompt: the figure and whether it is met."""
    out = {}
    for name, (what, metric, minimum) in TARGETS.items():
        for prompt in ("click", "box"):
            mine = [r[metric] for r in rows if r["path"] == "zoom" and r["prompt"] == prompt
                    and (r["kind"] == what or r["defect"] == what)]
            if mine:
                value = statistics.mean(mine)
                out[f"{name}_{prompt}"] = {"value": round(value, 4), "target": minimum, "met": value >= minimum}
    return out


def run_fidelity_bench(args) -> dict:
    size = (args.height, args.width)
    config = ZoomConfig(threshold=args.threshold, max_zoom=args.max_zoom, max_windows=args.max_windows,
                        edges=not args.no_edges)
    print(f"making {args.screens} synthetic screen(s) of {args.width} x {args.height} ...", flush=True)
    screens = [make_screen(size, seed) for seed in range(args.screens)]
    print("ceiling (stand-in decoder returning the ground truth's coverage of its 256x256 grid):", flush=True)
    rows = run_ceiling(screens, args.input_side, config, out=__import__("sys").stdout)
    figures: dict = {
        "image": {"width": args.width, "height": args.height, "screens": args.screens},
        "input_side": args.input_side,
        "config": dataclasses.asdict(config),
        "decoder": "stand-in: ground-truth coverage of each low-res cell (the ceiling of any SAM through this geometry)",
    }
    figures.update(summarise(rows))
    figures["targets"] = check_targets(rows)
    figures["rows"] = rows
    if args.timing:
        from backend.bench.fidelity_timing import time_zoom_clicks

        figures["timing"] = time_zoom_clicks(args, screens[0])
    return figures


def print_fidelity_table(figures: dict) -> None:
    print()
    img = figures["image"]
    print(f"fidelity on {img['screens']} synthetic {img['width']}x{img['height']} screen(s), encoder input "
          f"{figures['input_side']} px; CEILING figures: a stand-in decoder returns the ground truth's coverage of each "
          "cell of whatever window it is given (no real SAM weights here), so these are the best any SAM could "
          "reach through each path's geometry")
    header = (f"{'defect':<10} {'prompt':<6} {'whole IoU':>9} {'zoom IoU':>9} {'whole bIoU':>10} {'zoom bIoU':>10}"
              f" {'whole rec':>9} {'zoom rec':>9} {'line rec':>9} {'windows':>8}")
    print(header)
    print("-" * len(header))
    for kind in KINDS:
        if kind not in figures["zoom"]:
            continue
        for prompt in ("click", "box"):
            w, z = figures["whole"][kind][prompt], figures["zoom"][kind][prompt]
            line = f"{w.get('line_recall', float('nan')):.2f}->{z.get('line_recall', float('nan')):.2f}" \
                if "line_recall" in z else ""
            print(f"{kind:<10} {prompt:<6} {w['iou']:>9.3f} {z['iou']:>9.3f} {w['boundary_iou']:>10.3f}"
                  f" {z['boundary_iou']:>10.3f} {w['recall']:>9.3f} {z['recall']:>9.3f} {line:>9} {z['windows']:>8.1f}")
    for name, entry in figures["zoom"].get("scratch", {}).get("by_defect", {}).items():
        print(f"  {name}: zoom IoU {entry['iou']:.3f} (whole {figures['whole']['scratch']['by_defect'][name]['iou']:.3f})")
    print("boundary IoU: bands 2 px inside each contour; rec: pixel recall; line rec: share of a thin defect's "
          "centreline covered (whole -> zoom); windows: windows encoded per prompt on the zoom path")
    print("targets (zoom path, ceiling):")
    for name, t in figures["targets"].items():
        print(f"  {name:<28} {t['value']:.3f} (>= {t['target']}) {'met' if t['met'] else 'NOT met'}")
    timing = figures.get("timing")
    if timing:
        from backend.bench.fidelity_timing import print_timing

        print_timing(timing)
