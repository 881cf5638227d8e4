"""Train a refinement head on corrections, evaluate it against plain SAM and the served head, gate it.

Everything works in the encoder's input frame (long side 1024). The base segmenter is any
callable `base(features, prompt) -> logits` over that frame: SAM's decoder in production, a
controlled stand-in in `sam-backend bench learn`. It is frozen: its logits for every training
prompt are computed once, then only the head trains.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Any, Callable

import numpy as np
import torch

from model.interactive import (
    NOC_CAP, Click, boundary_iou, click_prompt, first_click, iou, jittered_box, next_click, noc,
)
from model.prompts import ModelPrompt
from model.refine import HeadConfig, RefineHead, crop_frame, crop_mask, head_inputs

log = logging.getLogger(__name__)

Base = Callable[[Any, ModelPrompt], np.ndarray]


@dataclasses.dataclass
class Correction:
    """One object as an annotator submitted it, ready for training or evaluation."""

    task_id: int
    image: np.ndarray  # RGB uint8, encoder input size
    gt: np.ndarray  # bool, encoder input size
    features: Any  # what the base segmenter needs for this image (SAM: the cached Embedding)
    label: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 250
    batch: int = 8
    lr: float = 2e-3
    seed: int = 0
    head: HeadConfig = HeadConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def held_out(task_id: int, every: int = 5) -> bool:
    """A fixed 1-in-`every` split by task: a held-out task is never trained on, by any version."""
    return (task_id * 2654435761) % 2**32 % every == 0


def split(objects: list[Correction], every: int = 5) -> tuple[list[Correction], list[Correction]]:
    train = [o for o in objects if not held_out(o.task_id, every)]
    heldout = [o for o in objects if held_out(o.task_id, every)]
    return train, heldout


def _sample_prompts(obj: Correction, base: Base, rng: np.random.Generator) -> list[ModelPrompt]:
    """The prompts annotators give: a central click, random interior clicks, boxes, and the
    follow-up clicks SAM's own errors call for."""
    prompts = [click_prompt([first_click(obj.gt)])]
    ys, xs = np.nonzero(obj.gt)
    for i in rng.choice(len(xs), size=min(2, len(xs)), replace=False):
        prompts.append(click_prompt([Click(xs[i] + 0.5, ys[i] + 0.5, True)]))
    prompts += [ModelPrompt(None, None, jittered_box(obj.gt, rng)) for _ in range(2)]
    clicks = [first_click(obj.gt)]
    for _ in range(2):
        click = next_click(base(obj.features, click_prompt(clicks)) > 0, obj.gt)
        if click is None:
            break
        clicks = clicks + [click]
        prompts.append(click_prompt(clicks))
    return prompts


def training_samples(objects: list[Correction], base: Base, config: HeadConfig, seed: int = 0):
    """Head inputs and targets for every simulated prompt, as float16 / bool arrays."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for obj in objects:
        for prompt in _sample_prompts(obj, base, rng):
            logits = base(obj.features, prompt)
            frame = crop_frame(logits, prompt, config)
            xs.append(head_inputs(obj.image, logits, prompt, frame, config.crop).astype(np.float16))
            ys.append(crop_mask(obj.gt, frame, config.crop))
    return np.stack(xs), np.stack(ys)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)
    return bce + dice.mean()


def train_head(x: np.ndarray, y: np.ndarray, config: TrainConfig, device: torch.device | str = "cpu",
               progress: Callable[[int, int, float], None] | None = None, head: RefineHead | None = None,
               steps: int | None = None, first_step: int = 0) -> RefineHead:
    """Fit a head on prepared samples (random flips and transposes; AdamW, cosine schedule over
    `config.steps`). With `head`, go on training it from `first_step` for `steps` more steps."""
    torch.manual_seed(config.seed + first_step)
    rng = np.random.default_rng(config.seed + first_step)
    head = (head or RefineHead(config.head)).to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step + first_step, config.steps) / max(config.steps, 1))))
    steps = config.steps - first_step if steps is None else steps
    for step in range(steps):
        idx = rng.choice(len(x), size=min(config.batch, len(x)), replace=len(x) < config.batch)
        xb = torch.from_numpy(x[idx].astype(np.float32)).to(device)
        yb = torch.from_numpy(y[idx].astype(np.float32)).to(device)
        if rng.random() < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if rng.random() < 0.5:
            xb, yb = xb.flip(-2), yb.flip(-2)
        if rng.random() < 0.5:
            xb, yb = xb.transpose(-1, -2), yb.transpose(-1, -2)
        loss = _loss(head(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(first_step + step + 1, config.steps, loss.item())
    return head.eval()


def on_policy_samples(objects: list[Correction], base: Base, head: RefineHead, config: HeadConfig,
                      clicks: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Samples along the click sequences the head itself provokes: after the first rounds of
    training, annotators correct the head's errors, not SAM's, and the head must follow those clicks."""
    xs, ys = [], []
    for obj in objects:
        sequence = [first_click(obj.gt)]
        for _ in range(clicks - 1):
            prompt = click_prompt(sequence)
            click = next_click(head.refine(obj.image, base(obj.features, prompt), prompt) > 0, obj.gt)
            if click is None:
                break
            sequence = sequence + [click]
            prompt = click_prompt(sequence)
            logits = base(obj.features, prompt)
            frame = crop_frame(logits, prompt, config)
            xs.append(head_inputs(obj.image, logits, prompt, frame, config.crop).astype(np.float16))
            ys.append(crop_mask(obj.gt, frame, config.crop))
    if not xs:
        return np.zeros((0, 7, config.crop, config.crop), np.float16), np.zeros((0, config.crop, config.crop), bool)
    return np.stack(xs), np.stack(ys)


class Segmenter:
    """Base, or base + head: masks for prompts, with the base's logits memoised per prompt
    (plain SAM, the served head and the candidate all start from the same first click and box)."""

    def __init__(self, base: Base, head: RefineHead | None, memo: dict | None = None):
        self.base = base
        self.head = head
        self.memo = {} if memo is None else memo

    def __call__(self, obj: Correction, prompt: ModelPrompt) -> np.ndarray:
        key = (id(obj), _prompt_key(prompt))
        logits = self.memo.get(key)
        if logits is None:
            logits = self.memo[key] = self.base(obj.features, prompt)
        if self.head is not None:
            logits = self.head.refine(obj.image, logits, prompt)
        return logits > 0


def _prompt_key(prompt: ModelPrompt) -> bytes:
    parts = [a.tobytes() if a is not None else b"-" for a in (prompt.points, prompt.labels, prompt.box)]
    return b"|".join(parts)


def evaluate(objects: list[Correction], segmenter: Segmenter, noc_cap: int = NOC_CAP) -> dict[str, float]:
    """mIoU after one click and after a box, boundary IoU, NoC@85 and NoC@90, averaged over objects."""
    if not objects:
        return {}
    rows = []
    for i, obj in enumerate(objects):
        box = jittered_box(obj.gt, np.random.default_rng(1000 + i))  # the same box for every variant
        click_mask = segmenter(obj, click_prompt([first_click(obj.gt)]))
        box_mask = segmenter(obj, ModelPrompt(None, None, box))
        needed = noc(lambda clicks: segmenter(obj, click_prompt(clicks)), obj.gt, cap=noc_cap)
        rows.append((iou(click_mask, obj.gt), iou(box_mask, obj.gt),
                     (boundary_iou(click_mask, obj.gt) + boundary_iou(box_mask, obj.gt)) / 2,
                     needed[0.85], needed[0.90]))
    a = np.array(rows, dtype=np.float64).mean(axis=0)
    return {"miou_click": 100 * a[0], "miou_box": 100 * a[1], "miou": 100 * (a[0] + a[1]) / 2,
            "boundary_iou": 100 * a[2], "noc85": a[3], "noc90": a[4], "objects": len(objects)}


def gate(candidate: dict, served: dict, margin: float) -> tuple[bool, str]:
    """Promote only a head that beats the served one by `margin` mIoU points and loses no NoC."""
    gain = candidate["miou"] - served["miou"]
    if gain < margin:
        return False, f"mIoU {candidate['miou']:.1f} vs served {served['miou']:.1f}: gain {gain:+.1f} < margin {margin:.1f}"
    for key, name in (("noc90", "NoC@90"), ("noc85", "NoC@85")):
        if candidate[key] > served[key] + 1e-9:
            return False, f"{name} {candidate[key]:.2f} is worse than served {served[key]:.2f}"
    return True, (f"mIoU {served['miou']:.1f} -> {candidate['miou']:.1f} ({gain:+.1f}), "
                  f"NoC@90 {served['noc90']:.2f} -> {candidate['noc90']:.2f}")


@dataclasses.dataclass
class Outcome:
    head: RefineHead
    metrics: dict  # {"base": {...}, "served": {...}, "candidate": {...}}
    promoted: bool
    reason: str
    train_seconds: float
    samples: int


def train_and_gate(train: list[Correction], heldout: list[Correction], base: Base, served: RefineHead | None,
                   config: TrainConfig, margin: float, device: torch.device | str = "cpu",
                   progress: Callable[[str, int, int], None] | None = None) -> Outcome:
    """One training round: samples -> candidate head -> held-out metrics of base, served, candidate -> gate.

    The candidate starts from the served head (plain SAM's zero head when none), trains on the
    simulated prompts, then on the clicks its own errors provoke (on-policy), and must then beat
    the served head on the held-out tasks."""
    report = progress or (lambda stage, done, total: None)
    start = time.perf_counter()
    report("samples", 0, len(train))
    x, y = training_samples(train, base, config.head, config.seed)
    report("train", 0, config.steps)
    def step_report(step: int, total: int, loss: float) -> None:
        report("train", step, total)

    warmup = int(config.steps * 0.6)
    start_from = None
    if served is not None and served.config == config.head:
        start_from = copy.deepcopy(served).to(device)  # go on from what is served: gains add up round after round
    head = train_head(x, y, config, device, step_report, head=start_from, steps=warmup)
    report("samples", len(train), len(train))
    x2, y2 = on_policy_samples(train, base, head.cpu(), config.head)
    x, y = np.concatenate([x, x2]), np.concatenate([y, y2])
    head = train_head(x, y, config, device, step_report, head=head.to(device), first_step=warmup).cpu()
    train_seconds = time.perf_counter() - start
    memo: dict = {}
    report("evaluate", 0, 3)
    metrics = {"base": evaluate(heldout, Segmenter(base, None, memo))}
    report("evaluate", 1, 3)
    metrics["served"] = metrics["base"] if served is None else evaluate(heldout, Segmenter(base, served, memo))
    report("evaluate", 2, 3)
    metrics["candidate"] = evaluate(heldout, Segmenter(base, head, memo))
    report("evaluate", 3, 3)
    promoted, reason = gate(metrics["candidate"], metrics["served"], margin)
    log.info("candidate head %s: %s", "promoted" if promoted else "rejected", reason)
    return Outcome(head, metrics, promoted, reason, train_seconds, len(x))
