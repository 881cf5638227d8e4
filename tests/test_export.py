"""COCO export of Label Studio regions (the shapes Label Studio exports and our drafts have)."""

from __future__ import annotations

import numpy as np

from backend.commands.export_coco import to_coco
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.rle import mask_to_rle
from tests.conftest import protocol_body

CONFIG = parse_label_config(protocol_body("setup.json")["schema"])
W, H = 200, 100


def brush(mask: np.ndarray, label: str = "Object") -> dict:
    return {"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": W,
            "original_height": H, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def polygon(points: list, label: str = "Object") -> dict:
    return {"type": "polygonlabels", "from_name": "poly", "to_name": "image", "original_width": W,
            "original_height": H, "value": {"points": points, "closed": True, "polygonlabels": [label]}}


def test_brush_and_polygon_regions_become_coco_polygons_in_pixels():
    mask = np.zeros((H, W), bool)
    mask[20:60, 50:150] = True  # 40 x 100 = 4000 px
    tasks = [
        {"id": 7, "data": {"image": "/data/upload/a.png"},
         "predictions": [{"id": 1, "model_version": "old", "result": [], "created_at": "2026-01-01"},
                         {"id": 2, "model_version": "sam-x", "score": 0.8, "created_at": "2026-02-01",
                          "result": [brush(mask), polygon([[10, 10], [30, 10], [30, 50]])]}]},
        {"id": 8, "data": {"image": "/data/upload/b.png"}, "predictions": []},
    ]
    coco = to_coco(tasks, CONFIG, "predictions")
    assert [c["name"] for c in coco["categories"]] == ["Object"]
    assert [i["id"] for i in coco["images"]] == [7, 8]
    assert coco["images"][0]["width"] == W and coco["images"][0]["height"] == H
    assert len(coco["annotations"]) == 2
    rect, tri = coco["annotations"]
    assert rect["image_id"] == 7 and rect["category_id"] == 1 and rect["score"] == 0.8
    assert rect["area"] == 4000  # counted on the mask's pixels
    assert rect["bbox"] == [50.0, 20.0, 100.0, 40.0]
    assert sorted(rect["segmentation"][0][0::2]) [0] == 50.0 and max(rect["segmentation"][0][0::2]) == 149.0
    # 10 %, 30 % of 200 px wide; 10 %, 50 % of 100 px high
    assert tri["segmentation"] == [[20.0, 10.0, 60.0, 10.0, 60.0, 50.0]]
    assert tri["area"] == 800.0


def test_annotations_source_model_version_filter_and_unknown_labels():
    tasks = [{"id": 1, "data": {"image": "x"},
              "annotations": [{"id": 1, "was_cancelled": True, "result": [polygon([[0, 0], [50, 0], [50, 50]])]},
                              {"id": 2, "result": [polygon([[0, 0], [10, 0], [10, 10]]),
                                                   polygon([[0, 0], [10, 0], [10, 10]], label="Ghost")]}],
              "predictions": [{"id": 3, "model_version": "a", "result": [polygon([[0, 0], [20, 0], [20, 20]])]}]}]
    coco = to_coco(tasks, CONFIG, "annotations")
    assert len(coco["annotations"]) == 1  # the cancelled one is skipped, the unknown label too
    assert coco["annotations"][0]["area"] == 0.5 * 20 * 10
    assert to_coco(tasks, CONFIG, "predictions", model_version="b")["annotations"] == []
    assert len(to_coco(tasks, CONFIG, "predictions", model_version="a")["annotations"]) == 1


def test_training_and_export_take_the_same_annotation_as_ground_truth():
    # the rule was written twice with different results: training skipped empty annotations and
    # read only updated_at; the export also read created_at and kept empty ones
    from backend.labelstudio.corrections import task_objects

    config = parse_label_config(protocol_body("predict_batch.json")["label_config"])
    older = {"id": 1, "created_at": "2026-01-01", "result": [polygon([[10, 10], [60, 10], [60, 80]])]}
    task = {"id": 5, "data": {"image": "x"}, "annotations": [older]}
    assert len(task_objects(task, config)) == 1 and len(to_coco([task], config, "annotations")["annotations"]) == 1
    # the annotator later removed every region: nothing to mark now, for both
    task["annotations"].append({"id": 2, "created_at": "2026-03-01", "result": []})
    assert task_objects(task, config) == []
    assert to_coco([task], config, "annotations")["annotations"] == []
    # a newer annotation only known by created_at wins for both
    newer = {"id": 3, "created_at": "2026-05-01", "result": [polygon([[5, 5], [30, 5], [30, 30]]),
                                                          polygon([[40, 40], [90, 40], [90, 90]])]}
    task["annotations"].append(newer)
    assert len(task_objects(task, config)) == 2 and len(to_coco([task], config, "annotations")["annotations"]) == 2
