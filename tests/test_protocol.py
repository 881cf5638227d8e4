"""backend/web/protocol.py, backend/labelstudio/prompts.py and label_config.py on request bodies Label Studio 1.23.2 really sent."""

from __future__ import annotations

import copy

import pytest

from backend.errors import InvalidRequest, UnservableConfig, UnsupportedInput
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.prompts import ClickPrompt, parse_click, task_image_url
from backend.labelstudio.protocol import BatchRequest, ClickRequest, parse_predict, project_number
from tests.conftest import protocol_body

BATCH = "predict_batch.json"
KEYPOINT = "predict_interactive_keypointlabels.json"
RECTANGLE = "predict_interactive_rectanglelabels.json"


def body(name: str) -> dict:
    return copy.deepcopy(protocol_body(name))


@pytest.fixture
def config():
    return parse_label_config(protocol_body(KEYPOINT)["label_config"])


def keypoint_regions() -> list[dict]:
    return body(KEYPOINT)["params"]["context"]["result"]


def rectangle_regions() -> list[dict]:
    return body(RECTANGLE)["params"]["context"]["result"]


# ---------------------------------------------------------------- parse_predict


def test_parse_predict_batch_body():
    raw = body(BATCH)
    request = parse_predict(raw)
    assert isinstance(request, BatchRequest)  # batch: params.context is null
    assert [t["id"] for t in request.tasks] == [1, 2, 3]
    assert request.config == parse_label_config(raw["label_config"])
    assert request.project_id == 1


def test_parse_predict_interactive_bodies():
    for name, n_points, box in ((KEYPOINT, 2, False), (RECTANGLE, 0, True)):
        raw = body(name)
        request = parse_predict(raw)
        assert isinstance(request, ClickRequest)
        assert request.task["id"] == 1 and request.project_id == 1
        assert request.image_url == raw["tasks"][0]["data"]["image"]
        assert len(request.click.prompt.points) == n_points and (request.click.prompt.box is not None) == box


@pytest.mark.parametrize("project, number", [(7, 7), ("7", 7), ("12.1795392730", 12), (None, None), (True, None),
                                             ("\u00b2", None), ("111111111111111", None), ("-3.1", None), ("", None)])
def test_project_number(project, number):
    # "²" is a digit to str.isdigit but not to int(): it once answered 500
    assert project_number(project.encode().decode("unicode_escape") if isinstance(project, str) else project) == number


@pytest.mark.parametrize("raw", [None, [], "tasks", 3])
def test_parse_predict_rejects_non_object_body(raw):
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_predict(raw)


@pytest.mark.parametrize("tasks", [None, "1", {"id": 1}, [1, 2], [{"id": 1}, "x"]])
def test_parse_predict_rejects_tasks_not_a_list_of_objects(tasks):
    raw = body(BATCH)
    raw["tasks"] = tasks
    with pytest.raises(InvalidRequest, match="'tasks'"):
        parse_predict(raw)


def test_parse_predict_requires_label_config():
    raw = body(BATCH)
    del raw["label_config"]
    with pytest.raises(InvalidRequest, match="label_config"):
        parse_predict(raw)
    raw["label_config"] = {"view": 1}
    with pytest.raises(InvalidRequest, match="label_config"):
        parse_predict(raw)


def test_parse_predict_rejects_params_not_an_object():
    raw = body(BATCH)
    raw["params"] = ["context"]
    with pytest.raises(InvalidRequest, match="'params'"):
        parse_predict(raw)


def test_parse_predict_interactive_with_two_tasks():
    raw = body(KEYPOINT)
    raw["tasks"] = raw["tasks"] * 2
    with pytest.raises(InvalidRequest, match="exactly one task, got 2"):
        parse_predict(raw)


@pytest.mark.parametrize("context", [{"result": "x"}, {"regions": []}, ["result"]])
def test_parse_predict_rejects_malformed_context(context):
    raw = body(KEYPOINT)
    raw["params"]["context"] = context
    with pytest.raises(InvalidRequest, match="params.context"):
        parse_predict(raw)


def test_empty_context_result_is_nothing_to_segment(config):
    raw = body(KEYPOINT)
    raw["params"]["context"]["result"] = []
    with pytest.raises(InvalidRequest, match="empty"):
        parse_predict(raw)


# ---------------------------------------------------------------- parse_click


def test_parse_click_keypoints(config):
    click = parse_click(body(KEYPOINT)["params"]["context"]["result"], config)
    assert isinstance(click, ClickPrompt)
    assert click.label == "Object"
    assert len(click.prompt.points) == 2
    (x0, y0), (x1, y1) = click.prompt.points
    assert (x0, y0) == pytest.approx((0.375, 0.416667), abs=1e-6)
    assert (x1, y1) == pytest.approx((0.8, 0.8), abs=1e-9)
    assert click.prompt.labels == (1, 0)  # is_positive true, then false
    assert click.prompt.box is None


def test_parse_click_rectangle(config):
    click = parse_click(body(RECTANGLE)["params"]["context"]["result"], config)
    assert click.label == "Object"
    assert click.prompt.points == ()
    assert click.prompt.box == pytest.approx((0.2, 0.225, 0.55, 0.525), abs=1e-9)


def test_parse_click_combines_points_and_the_last_box(config):
    first_box = rectangle_regions()[0]
    second_box = copy.deepcopy(first_box)
    second_box["value"].update(x=10.0, y=10.0, width=20.0, height=40.0)
    click = parse_click(keypoint_regions() + [first_box, second_box], config)
    assert len(click.prompt.points) == 2
    assert click.prompt.box == pytest.approx((0.1, 0.1, 0.3, 0.5), abs=1e-9)


def test_parse_click_keypoint_without_is_positive_is_positive(config):
    region = keypoint_regions()[0]
    del region["is_positive"]
    assert parse_click([region], config).prompt.labels == (1,)


def test_parse_click_clamps_a_hair_past_the_border(config):
    region = keypoint_regions()[0]
    region["value"].update(x=100.0000001, y=-0.0000001)
    assert parse_click([region], config).prompt.points == ((1.0, 0.0),)


def test_unknown_region_type(config):
    region = keypoint_regions()[0]
    region["type"] = "brushlabels"
    with pytest.raises(InvalidRequest, match="brushlabels") as info:
        parse_click([region], config)
    assert "keypointlabels and rectanglelabels" in info.value.message


def test_region_without_value_object(config):
    region = keypoint_regions()[0]
    region["value"] = [37.5, 41.6]
    with pytest.raises(InvalidRequest, match="'value' object"):
        parse_click([region], config)


@pytest.mark.parametrize(
    "x, problem",
    [
        (150, "outside the image"),
        (-5, "outside the image"),
        ("abc", "finite number"),
        (float("nan"), "finite number"),
        (float("inf"), "finite number"),
        (None, "finite number"),
        (True, "finite number"),
    ],
)
def test_bad_keypoint_coordinate(config, x, problem):
    region = keypoint_regions()[0]
    region["value"]["x"] = x
    with pytest.raises(InvalidRequest, match=problem) as info:
        parse_click([region], config)
    assert "value.x" in info.value.message
    assert "context region 0" in info.value.message


def test_missing_y_coordinate(config):
    region = keypoint_regions()[1]
    del region["value"]["y"]
    with pytest.raises(InvalidRequest, match="context region 1: value.y"):
        parse_click(keypoint_regions()[:1] + [region], config)


def test_negative_width_box(config):
    region = rectangle_regions()[0]
    region["value"]["width"] = -10.0
    with pytest.raises(InvalidRequest, match="width"):
        parse_click([region], config)


def test_zero_height_box(config):
    region = rectangle_regions()[0]
    region["value"]["height"] = 0
    with pytest.raises(InvalidRequest, match="no area"):
        parse_click([region], config)


def test_box_leaving_the_image(config):
    region = rectangle_regions()[0]
    region["value"].update(x=80.0, width=30.0)
    with pytest.raises(InvalidRequest, match="leaves the image"):
        parse_click([region], config)


def test_rotated_image_is_unsupported(config):
    region = keypoint_regions()[0]
    region["image_rotation"] = 90
    with pytest.raises(UnsupportedInput, match="rotated by 90"):
        parse_click([region], config)


def test_rotated_rectangle_is_unsupported(config):
    region = rectangle_regions()[0]
    region["value"]["rotation"] = 15
    with pytest.raises(UnsupportedInput, match="rotated rectangles"):
        parse_click([region], config)


@pytest.mark.parametrize("dim", ["original_width", "original_height"])
@pytest.mark.parametrize("size", [0, -80, "80", True])
def test_bad_original_size(config, dim, size):
    region = keypoint_regions()[0]
    region[dim] = size
    with pytest.raises(InvalidRequest, match=f"{dim} must be a positive number"):
        parse_click([region], config)


def test_label_list_must_hold_names(config):
    region = keypoint_regions()[0]
    region["value"]["keypointlabels"] = [3]
    with pytest.raises(InvalidRequest, match="list of label names"):
        parse_click([region], config)


# ---------------------------------------------------------------- label config

BRUSH_ONLY = """<View>
  <Image name="img" value="$photo"/>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="Cat"/></KeyPointLabels>
  <BrushLabels name="mask" toName="img"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
</View>"""

NO_IMAGE = """<View>
  <Text name="text" value="$text"/>
  <Labels name="lbl" toName="text"><Label value="Object"/></Labels>
</View>"""

NO_OUTPUT = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image"><Label value="Object"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image"><Label value="Object"/></RectangleLabels>
</View>"""


def test_protocol_config(config):
    assert config.image_field == "image"
    assert config.image_name == "image"
    assert config.prompt_tags == ("kp", "rect")
    assert [(o.name, o.kind, o.labels) for o in config.outputs] == [
        ("brush", "brush", ("Object",)),
        ("poly", "polygon", ("Object",)),
    ]
    assert [o.region_type for o in config.outputs] == ["brushlabels", "polygonlabels"]
    assert config.all_labels == ("Object",)
    assert config.default_label() == "Object"


def test_setup_schema_parses_like_predict_config(config):
    schema = protocol_body("setup.json")["schema"]
    assert parse_label_config(schema) == config


def test_config_without_image():
    with pytest.raises(UnservableConfig, match="<Image>"):
        parse_label_config(NO_IMAGE)


def test_config_without_output_tag():
    with pytest.raises(UnservableConfig) as info:
        parse_label_config(NO_OUTPUT)
    assert "BrushLabels" in info.value.message
    assert "PolygonLabels" in info.value.message


@pytest.mark.parametrize("text", ["", "   ", "<View><Image name="])
def test_empty_or_broken_config(text):
    with pytest.raises(UnservableConfig):
        parse_label_config(text)


def test_outputs_for_unknown_label_names_it(config):
    with pytest.raises(UnservableConfig, match="'Missing'") as info:
        config.outputs_for("Missing", "both")
    assert "brush" in info.value.message and "poly" in info.value.message


def test_outputs_for_both(config):
    assert [o.name for o in config.outputs_for("Object", "both")] == ["brush", "poly"]


def test_output_type_selects_one_kind_when_both_exist(config):
    assert [o.name for o in config.outputs_for("Object", "brush")] == ["brush"]
    assert [o.name for o in config.outputs_for("Object", "polygon")] == ["poly"]


def test_output_type_falls_back_to_the_kind_the_config_has():
    brush_only = parse_label_config(BRUSH_ONLY)
    assert brush_only.image_field == "photo" and brush_only.image_name == "img"
    assert brush_only.all_labels == ("Cat", "Dog")
    chosen = brush_only.outputs_for("Dog", "polygon")
    assert [(o.name, o.kind) for o in chosen] == [("mask", "brush")]


# ---------------------------------------------------------------- task_image_url


def test_task_image_url(config):
    tasks = parse_predict(body(BATCH)).tasks
    assert [task_image_url(t, config) for t in tasks] == [
        "/data/local-files/?d=local/img_local.png",
        "http://127.0.0.1:8081/img_http.png",
        "/data/upload/1/e13a3064-img_upload.png",
    ]


@pytest.mark.parametrize("data", [{}, {"img": "/data/x.png"}, {"image": ""}, {"image": 5}, None])
def test_task_without_image_url(config, data):
    task = {"id": 42, "data": data}
    with pytest.raises(InvalidRequest, match="task 42 has no image URL in data.image"):
        task_image_url(task, config)
