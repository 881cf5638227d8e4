"""SAM decoding paths, embedding storage fidelity, and mask -> polygon quality."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from backend.bench.click import smooth_logits
from backend.pipeline.embeddings import CorruptEmbedding, Embedding, deserialize, serialize
from backend.pipeline.images import decode_image
from model import masks
from model.prompts import Prompt, preprocess_shape, to_model
from model.sam import SamModel
from tests.conftest import make_image


def rasterize(polygon_list: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of masks.polygons: fill the traced polygons back into a mask."""
    canvas = np.zeros(shape, dtype=np.uint8)
    pts = [np.round(p).astype(np.int32).reshape(-1, 1, 2) for p in polygon_list]
    cv2.fillPoly(canvas, pts, 1)
    return canvas.astype(bool)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint, tmp_path_factory):
    return SamModel.load(tiny_checkpoint, "0" * 64, "cpu", onnx_dir=tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def features(tiny_model):
    image = decode_image(make_image(160, 120, seed=5), 10**8)
    return tiny_model.encode(image.input_image), image


PROMPTS = [
    Prompt(((0.4, 0.45),), (1,)),
    Prompt(((0.4, 0.45), (0.8, 0.8)), (1, 0)),
    Prompt(box=(0.2, 0.25, 0.6, 0.65)),
    Prompt(((0.4, 0.45),), (1,), box=(0.2, 0.25, 0.6, 0.65)),
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["point", "pos+neg", "box", "box+point"])
def test_onnx_decoder_matches_torch(tiny_model, features, prompt):
    feats, image = features
    model_prompt = to_model(prompt, image.input_size)
    assert tiny_model.onnx is not None
    onnx_logits, onnx_score = tiny_model.decode(feats, model_prompt)
    torch_logits, torch_score = tiny_model.decode_torch(feats, model_prompt)
    assert onnx_logits.shape == torch_logits.shape == (256, 256)
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3
    assert abs(onnx_score - torch_score) < 1e-4


def test_stored_embedding_gives_the_same_mask_as_fp32(tiny_model, features):
    feats, image = features
    stored = deserialize(serialize(Embedding(feats, image.original_size, image.input_size)))
    assert stored.original_size == image.original_size and stored.input_size == image.input_size
    rel = np.abs(stored.features - feats).max() / np.abs(feats).max()
    assert rel < 1e-3
    ious = []
    for prompt in PROMPTS:
        mp = to_model(prompt, image.input_size)
        a = masks.mask_at_input(masks.logits_at_input(tiny_model.decode(feats, mp)[0], image.input_size))
        b = masks.mask_at_input(masks.logits_at_input(tiny_model.decode(stored.features, mp)[0], image.input_size))
        ious.append((a & b).sum() / max((a | b).sum(), 1))
    assert min(ious) > 0.99, ious


def test_serialized_embedding_size_and_corruption():
    rng = np.random.default_rng(0)
    # smooth, embedding-like features: neighbouring cells correlate as in real SAM embeddings
    base = rng.standard_normal((256, 16, 16)).astype(np.float32)
    feats = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2) * 0.1
    blob = serialize(Embedding(feats, (3000, 4000), (768, 1024)))
    assert len(blob) < 2 * 256 * 64 * 64  # never larger than raw fp16
    with pytest.raises(CorruptEmbedding):
        deserialize(b"garbage")
    with pytest.raises(CorruptEmbedding):
        deserialize(blob[:-10])
    with pytest.raises(CorruptEmbedding):
        deserialize(blob[:8] + b"\0" * 16 + blob[24:])


def test_fresh_and_cached_embeddings_are_identical():
    feats = np.random.default_rng(1).standard_normal((256, 64, 64)).astype(np.float32)
    fresh = Embedding.quantized(feats, (10, 10), (1024, 1024))
    cached = deserialize(serialize(fresh))
    assert np.array_equal(fresh.features, cached.features)


@pytest.mark.parametrize("size", [(750, 1000), (3648, 5472), (600, 400)])
def test_polygons_rasterise_back_to_the_mask(size):
    """Polygons at the default tolerance, drawn back at full resolution, cover the brush mask (IoU >= 0.98)."""
    from backend.labelstudio.label_config import OutputTag
    from backend.labelstudio.results import polygon_regions
    from backend.settings import Settings

    height, width = size
    input_size = preprocess_shape(height, width)
    logits = masks.logits_at_input(smooth_logits(256, input_size), input_size)
    full = masks.mask_at_original(logits, size)
    defaults = Settings()
    regions = polygon_regions(
        OutputTag("poly", "polygon", ("Object",)), "image", "Object", logits, size, 0.9,
        defaults.polygon_tolerance, defaults.polygon_min_area,
    )
    assert regions
    polys = [np.array(r["value"]["points"]) / 100 * np.array([width, height]) - 0.5 for r in regions]
    drawn = rasterize(polys, size)
    iou = (drawn & full).sum() / (drawn | full).sum()
    assert iou >= 0.98, iou


def test_polygons_drop_parts_below_min_area_and_keep_each_part():
    mask = np.zeros((200, 200), bool)
    mask[10:60, 10:60] = True  # 2500 px
    mask[100:180, 120:190] = True  # 5600 px
    mask[150:153, 20:23] = True  # 9 px speck
    polys = masks.polygons(mask, tolerance=1.0, min_area=50)
    assert len(polys) == 2
    assert len(masks.polygons(mask, tolerance=1.0, min_area=3000)) == 1
    assert len(masks.polygons(mask, tolerance=1.0, min_area=0)) == 3


def test_full_resolution_mask_matches_torch_bilinear_upscale(tiny_model, features):
    """cv2's linear resize of the logits gives SamPredictor's mask (torch bilinear, align_corners=False)."""
    import torch
    import torch.nn.functional as F

    feats, image = features
    low, _ = tiny_model.decode(feats, to_model(PROMPTS[1], image.input_size))
    ours = masks.mask_at_original(masks.logits_at_input(low, image.input_size), image.original_size)
    t = torch.from_numpy(low)[None, None]
    t = F.interpolate(t, (1024, 1024), mode="bilinear", align_corners=False)
    t = t[..., : image.input_size[0], : image.input_size[1]]
    t = F.interpolate(t, image.original_size, mode="bilinear", align_corners=False)
    reference = (t[0, 0] > 0).numpy()
    assert (ours == reference).mean() > 0.999
