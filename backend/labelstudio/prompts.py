"""Label Studio's task data and regions as SAM prompts: the image URL of a task, the smart regions
of a click combined into one prompt, the boxes a task already carries. Malformed regions are InvalidRequest."""

from __future__ import annotations

import dataclasses
import math

from backend.errors import InvalidRequest, UnsupportedInput
from backend.labelstudio.label_config import PROMPT_TAGS, ProjectConfig
from model.prompts import Prompt

_EPS = 1e-6  # Label Studio rounds percentages; allow a hair past the border
MAX_URL_CHARS = 16_384  # presigned cloud URLs are long, but not this long
MAX_CLICK_REGIONS = 200  # an annotator's clicks on one object; 10,000 once cost 3 GB and a 500


@dataclasses.dataclass(frozen=True)
class ClickPrompt:
    prompt: Prompt
    label: str | None


def task_image_url(task: dict, config: ProjectConfig) -> str:
    data = task.get("data")
    url = data.get(config.image_field) if isinstance(data, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequest(f"task {task.get('id')} has no image URL in data.{config.image_field}")
    if not url.isprintable() or len(url) > MAX_URL_CHARS:
        raise InvalidRequest(f"task {task.get('id')}: data.{config.image_field} is not a usable URL "
                             f"(unprintable characters, or longer than {MAX_URL_CHARS})")
    return url.strip()


def _percent(value: dict, key: str, where: str) -> float:
    raw = value.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise InvalidRequest(f"{where}: value.{key} must be a finite number, got {raw!r}")
    if not -_EPS <= raw <= 100 + _EPS:
        raise InvalidRequest(f"{where}: value.{key}={raw} is outside the image (0-100 %)")
    return min(max(float(raw), 0.0), 100.0) / 100.0


def parse_click(regions: list, config: ProjectConfig) -> ClickPrompt:
    """Combine every smart region in the context into one SAM prompt: all points, the last box."""
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box = None
    label = None
    if not regions:
        raise InvalidRequest("'params.context.result' is empty: nothing to segment")
    if len(regions) > MAX_CLICK_REGIONS:
        raise InvalidRequest(f"'params.context.result' has {len(regions)} smart regions; at most "
                             f"{MAX_CLICK_REGIONS} are taken in one click")
    for i, region in enumerate(regions):
        where = f"context region {i}"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise InvalidRequest(f"{where} must be an object with a 'value' object")
        rtype = region.get("type")
        if rtype not in PROMPT_TAGS.values():
            raise InvalidRequest(
                f"{where} has type {rtype!r}; the backend takes keypointlabels and rectanglelabels prompts"
            )
        for dim in ("original_width", "original_height"):
            size = region.get(dim)
            if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0):
                raise InvalidRequest(f"{where}: {dim} must be a positive number, got {size!r}")
        if region.get("image_rotation") not in (None, 0, 0.0):
            raise UnsupportedInput(
                f"{where}: the image is rotated by {region['image_rotation']} degrees in Label Studio; "
                "rotate it back to 0 to use the smart tools"
            )
        value = region["value"]
        if rtype == "keypointlabels":
            points.append((_percent(value, "x", where), _percent(value, "y", where)))
            labels.append(0 if region.get("is_positive") is False else 1)
        else:
            if value.get("rotation") not in (None, 0, 0.0):
                raise UnsupportedInput(f"{where}: rotated rectangles are not supported; draw the box unrotated")
            x, y = _percent(value, "x", where), _percent(value, "y", where)
            w, h = _percent(value, "width", where), _percent(value, "height", where)
            if w <= 0 or h <= 0 or x + w > 1 + _EPS or y + h > 1 + _EPS:
                raise InvalidRequest(f"{where}: the box has no area or leaves the image")
            box = (x, y, min(x + w, 1.0), min(y + h, 1.0))
        region_labels = value.get(rtype) or value.get("labels")
        if region_labels:
            if not isinstance(region_labels, list) or not isinstance(region_labels[0], str):
                raise InvalidRequest(f"{where}: value.{rtype} must be a list of label names")
            label = region_labels[0]
    return ClickPrompt(Prompt(tuple(points), tuple(labels), box), label)


def task_boxes(task: dict, config: ProjectConfig) -> list[tuple[Prompt, str]]:
    """Boxes a task already carries (imported predictions, then annotations) as box prompts with their label.

    Malformed or rotated boxes are skipped: a batch must still answer for every task.
    """
    boxes = []
    for source in ("predictions", "annotations"):
        for item in task.get(source) or []:
            results = item.get("result") if isinstance(item, dict) else None
            for region in results or []:
                if not isinstance(region, dict) or region.get("type") != "rectanglelabels":
                    continue
                if region.get("to_name") not in (None, config.image_name):
                    continue
                try:
                    click = parse_click([region], config)
                except (InvalidRequest, UnsupportedInput):
                    continue
                if click.prompt.box is not None:
                    boxes.append((click.prompt, click.label or config.default_label()))
    return boxes
