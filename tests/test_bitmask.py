"""BitmaskLabels (Label Studio 1.23+): masks as PNG data URLs, written as the editor reads them, read
back bounded, and answered through the real app beside brush RLE for the same prompt."""

from __future__ import annotations

import base64
import copy
import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.commands.export_coco import to_coco
from backend.errors import InvalidRegion, UnservableConfig
from backend.labelstudio.bitmask import (DATA_URL_PREFIX, PNG_SIGNATURE, data_url_to_mask, mask_to_data_url,
                                         mask_to_png)
from backend.labelstudio.corrections import task_objects
from backend.labelstudio.label_config import OutputTag, parse_label_config
from backend.labelstudio.regions import region_mask
from backend.labelstudio.results import pixel_region, pixel_region_from_mask
from backend.labelstudio.rle import rle_to_mask
from backend.settings import Settings, SettingsError
from tests.test_api import LOCAL_IMAGE, keypoint_body, served  # noqa: F401 (served: a fixture)
from tests.test_zoom import URL as LARGE_URL, SIZE as LARGE_SIZE, box_body, large  # noqa: F401 (large: a fixture)

ROOT = Path(__file__).resolve().parents[1]
BITMASK_CONFIG = (ROOT / "label_config" / "surface_defects_bitmask.xml").read_text()
TAG = OutputTag("defect", "bitmask", ("Scratch",))
ODD_SIZES = [(1, 1), (1, 9), (3, 7), (7, 3), (9, 8), (37, 13), (101, 99)]


def random_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width)) > 0.5


def region_of(mask: np.ndarray, url: str | None = None, label: str = "Scratch") -> dict:
    height, width = mask.shape
    return {"id": "r1", "from_name": "defect", "to_name": "image", "type": "bitmasklabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"imageDataURL": mask_to_data_url(mask) if url is None else url, "bitmasklabels": [label]}}


def png_url(png: bytes) -> str:
    return DATA_URL_PREFIX + base64.b64encode(png).decode()


def with_config(body: dict, config: str) -> dict:
    body = copy.deepcopy(body)
    body["label_config"] = config
    return body


# ---------------------------------------------------------------- the PNG, as the editor reads it

@pytest.mark.parametrize("size", ODD_SIZES + [(64, 64)], ids=lambda s: f"{s[1]}x{s[0]}")
def test_png_round_trip_is_exact_at_odd_sizes(size):
    for mask in (random_mask(*size), np.zeros(size, bool), np.ones(size, bool)):
        assert np.array_equal(data_url_to_mask(mask_to_data_url(mask), *size), mask)


@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_png_is_the_image_size_with_the_mask_in_its_alpha_for_two_other_decoders(size):
    """What Label Studio's editor does with it: decode, size the canvas to the PNG, alpha > 0 is the mask."""
    mask = random_mask(*size, seed=1)
    png = mask_to_png(mask)
    with Image.open(io.BytesIO(png)) as image:  # PIL, converting as a browser does (palette + tRNS -> RGBA)
        assert image.size == (size[1], size[0])
        rgba = np.asarray(image.convert("RGBA"))
    assert np.array_equal(rgba[..., 3] > 0, mask)
    assert set(np.unique(rgba[..., 3])) <= {0, 255} and not rgba[..., :3].any()  # opaque black on transparent
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)  # libpng
    assert decoded.shape == (size[0], size[1], 4)
    assert np.array_equal(decoded[..., 3] > 0, mask)


def test_a_label_studio_rgba_png_is_read_by_its_alpha():
    """After an edit the editor writes canvas.toDataURL('image/png'): black on transparent, 8-bit RGBA."""
    mask = random_mask(37, 53, seed=2)
    rgba = np.zeros((37, 53, 4), np.uint8)
    rgba[mask, 3] = 255
    rgba[~mask, :3] = 255  # a transparent pixel's colour means nothing: only alpha marks the mask
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    assert np.array_equal(data_url_to_mask(png_url(buffer.getvalue()), 37, 53), mask)


def test_region_validates_with_the_sdk_and_reads_back():
    mask = random_mask(30, 41, seed=3)
    logits = np.where(mask, 5.0, -5.0).astype(np.float32)  # already at the original size
    region = pixel_region(TAG, "image", "Scratch", logits, (30, 41), 0.8)
    assert region["type"] == "bitmasklabels"
    assert region["value"]["bitmasklabels"] == ["Scratch"] and region["value"]["imageDataURL"].startswith(DATA_URL_PREFIX)
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (41, 30, 0)
    interface = LabelInterface(BITMASK_CONFIG)
    assert interface.validate_prediction({"result": [region], "score": 0.8}, return_errors=True) in (True, [], None)
    wrong = copy.deepcopy(region)
    wrong["value"]["bitmasklabels"] = ["Not a label"]
    assert interface.validate_prediction({"result": [wrong], "score": 0.8}, return_errors=True) not in (True, [], None)

    label, back = region_mask(region)
    assert label == "Scratch" and np.array_equal(back, mask)
    label, small = region_mask(region, (15, 20))  # the training frame: resized like a brush region
    assert small.shape == (15, 20) and 0.8 < small.mean() / mask.mean() < 1.2


def test_zoom_region_keeps_its_meta():
    mask = random_mask(20, 30, seed=4)
    region = pixel_region_from_mask(TAG, "image", "Scratch", mask, 0.7, {"sam_path": "zoom", "sam_windows": 2})
    assert region["meta"] == {"sam_path": "zoom", "sam_windows": 2}
    assert np.array_equal(region_mask(region)[1], mask)


# ---------------------------------------------------------------- refused: a typed error, never a crash

def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height, with a few bytes of (bogus) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("url, size, words", [
    (None, (6, 8), "must start with"),
    (12345, (6, 8), "must start with"),
    ("https://example.com/mask.png", (6, 8), "must start with"),
    ("data:image/jpeg;base64," + base64.b64encode(jpeg_bytes()).decode(), (6, 8), "must start with"),
    (png_url(jpeg_bytes()), (6, 8), "not a PNG"),  # a JPEG behind a PNG data URL
    (DATA_URL_PREFIX + "not base64!!", (6, 8), "not valid base64"),
    (png_url(mask_to_png(np.ones((6, 9), bool))), (6, 8), "is 9 x 6; the image is 8 x 6"),
    (png_url(mask_to_png(np.ones((6, 8), bool))[:60]), (6, 8), "cannot be decoded"),  # truncated
    (DATA_URL_PREFIX + "A" * 3_000_000, (6, 8), "base64 characters"),  # longer than any 8 x 6 PNG
    # a bomb: 60000 x 60000 declared in a few bytes, against a region of the image's size ...
    (png_url(bomb_png(60_000, 60_000)), (6, 8), "is 60000 x 60000"),
    # ... and against a region that claims that size too: refused before any decoding
    (png_url(bomb_png(60_000, 60_000)), (60_000, 60_000), "at most"),
], ids=["none", "number", "http", "jpeg-url", "jpeg-bytes", "base64", "wrong-size", "truncated", "too-long",
        "bomb", "bomb-claimed"])
def test_bad_data_urls_are_refused_with_a_typed_error(url, size, words):
    with pytest.raises(InvalidRegion, match=words) as caught:
        data_url_to_mask(url, *size)
    assert caught.value.status == 422
    region = {"type": "bitmasklabels", "original_width": size[1], "original_height": size[0],
              "value": {"imageDataURL": url, "bitmasklabels": ["Scratch"]}}
    with pytest.raises(InvalidRegion):
        region_mask(region)


def test_training_skips_a_bad_bitmask_and_the_export_names_its_task():
    config = parse_label_config(BITMASK_CONFIG)
    good = region_of(np.pad(np.ones((20, 20), bool), 10))
    bad = region_of(np.ones((40, 40), bool), url=png_url(bomb_png(50_000, 50_000)))
    task = {"id": 7, "data": {"image": "x.png"}, "annotations": [{"id": 1, "result": [bad, good]}]}
    objects = task_objects(task, config, long_side=64)
    assert len(objects) == 1 and objects[0].label == "Scratch"  # the good region, the bad one skipped
    with pytest.raises(InvalidRegion, match="task 7: .*50000 x 50000"):
        to_coco([task], config, "annotations")
    task["annotations"][0]["result"] = [good]
    coco = to_coco([task], config, "annotations")
    assert [a["area"] for a in coco["annotations"]] == [400.0]
    assert coco["annotations"][0]["bbox"] == [10.0, 10.0, 20.0, 20.0]


# ---------------------------------------------------------------- the config and OUTPUT_TYPE

def test_bitmask_labels_is_an_output_tag():
    config = parse_label_config(BITMASK_CONFIG)
    assert [(o.name, o.kind, o.region_type) for o in config.outputs] == [("defect", "bitmask", "bitmasklabels")]
    assert config.prompt_tags == ("kp", "box")
    assert [o.kind for o in config.outputs_for("Pit", "bitmask")] == ["bitmask"]
    assert [o.kind for o in config.outputs_for("Pit", "brush")] == ["bitmask"]  # the kind the config has
    both = BITMASK_CONFIG.replace("</View>", '<BrushLabels name="b" toName="image"><Label value="Pit"/></BrushLabels>'
                                            '<PolygonLabels name="p" toName="image"><Label value="Pit"/></PolygonLabels>'
                                            "</View>")
    config = parse_label_config(both)
    assert [o.kind for o in config.outputs_for("Pit", "bitmask")] == ["bitmask"]
    assert [o.kind for o in config.outputs_for("Pit", "brush")] == ["brush"]
    assert sorted(o.kind for o in config.outputs_for("Pit", "both")) == ["bitmask", "brush", "polygon"]
    with pytest.raises(UnservableConfig, match="BitmaskLabels"):
        parse_label_config('<View><Image name="image" value="$image"/></View>')


def test_output_type_bitmask_is_a_setting():
    assert Settings.from_env({"OUTPUT_TYPE": "Bitmask"}).output_type == "bitmask"
    with pytest.raises(SettingsError, match="both, brush, polygon, bitmask"):
        Settings.from_env({"OUTPUT_TYPE": "png"})


# ---------------------------------------------------------------- through the real app

BRUSH_AND_BITMASK = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
  <BitmaskLabels name="bitmask" toName="image"><Label value="Object"/></BitmaskLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Object"/></PolygonLabels>
</View>"""


def answered_masks(result: dict, height: int, width: int) -> tuple[np.ndarray, dict]:
    regions = {r["type"]: r for r in result["result"]}
    bitmask = regions["bitmasklabels"]
    assert (bitmask["original_width"], bitmask["original_height"]) == (width, height)
    assert bitmask["from_name"] == "bitmask" and bitmask["value"]["bitmasklabels"] == ["Object"]
    return data_url_to_mask(bitmask["value"]["imageDataURL"], height, width), regions


def test_a_click_answers_a_bitmask_equal_to_the_brush_answer(client, served):
    c, _ = client
    body = with_config(keypoint_body(), BRUSH_AND_BITMASK)
    response = c.post("/predict", json=body)
    assert response.status_code == 200, response.json
    result = response.json["results"][0]
    assert LabelInterface(BRUSH_AND_BITMASK).validate_prediction(
        {"result": result["result"], "score": result["score"]}, return_errors=True) in (True, [], None)
    mask, regions = answered_masks(result, 60, 80)
    brush = rle_to_mask(regions["brushlabels"]["value"]["rle"], 60, 80)
    assert mask.any() and np.array_equal(mask, brush)


def test_output_type_bitmask_answers_only_the_bitmask(settings, make_client, served):
    c, _ = make_client(settings.replace(output_type="bitmask"))
    response = c.post("/predict", json=with_config(keypoint_body(), BRUSH_AND_BITMASK))
    assert response.status_code == 200, response.json
    assert [r["type"] for r in response.json["results"][0]["result"]] == ["bitmasklabels"]


def test_a_zoomed_box_answers_a_full_size_bitmask_equal_to_the_brush(client, large):
    c, _ = client
    height, width = LARGE_SIZE
    body = with_config(box_body((1000, 800, 1040, 830)), BRUSH_AND_BITMASK)
    assert body["tasks"][0]["data"]["image"] == LARGE_URL
    response = c.post("/predict", json=body)
    assert response.status_code == 200, response.json
    mask, regions = answered_masks(response.json["results"][0], height, width)
    assert regions["bitmasklabels"]["meta"] == {"sam_path": "zoom", "sam_windows": 1}
    assert np.array_equal(mask, rle_to_mask(regions["brushlabels"]["value"]["rle"], height, width))


def test_a_draft_from_boxes_answers_bitmasks(client, served):
    """The pre-label path: one bitmask per imported box, with the box's label."""
    _, services = client
    from backend.pipeline.timings import Timings

    config = parse_label_config(BRUSH_AND_BITMASK)
    box = {"from_name": "rect", "to_name": "image", "type": "rectanglelabels", "original_width": 80,
           "original_height": 60, "image_rotation": 0,
           "value": {"x": 20.0, "y": 20.0, "width": 50.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["Object"]}}
    task = {"id": 1, "data": {"image": LOCAL_IMAGE}, "predictions": [{"model_version": "detector", "result": [box]}]}
    embedding = services.embedder.for_url(LOCAL_IMAGE, Timings())
    draft = services.predictor.draft(task, embedding, config, Timings())
    mask, regions = answered_masks(draft, 60, 80)
    assert np.array_equal(mask, rle_to_mask(regions["brushlabels"]["value"]["rle"], 60, 80))


def test_bench_click_times_the_bitmask_output_beside_brush():
    """`bench click --outputs brush,bitmask`: the bench's config for each output, and its output stage."""
    from backend.bench.click import SIZES, _config, _time_output, smooth_logits
    from model.masks import logits_at_input

    for output in ("brush", "polygon", "bitmask"):
        assert [o.kind for o in parse_label_config(_config(output)).outputs] == [output]
    width, height = SIZES["1MP"]
    input_size = (round(1024 * height / width), 1024)
    logits = logits_at_input(smooth_logits(256, input_size), input_size)
    _, brush_bytes = _time_output("brush", logits, (width, height), repeat=1)
    _, bitmask_bytes = _time_output("bitmask", logits, (width, height), repeat=1)
    assert 0 < bitmask_bytes < brush_bytes  # a smooth object: 3.6 KB against 8.4 KB (README)
