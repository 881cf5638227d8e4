"""backend/rle.py against the Label Studio SDK's own brush encoder and decoder, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backend.labelstudio.rle import _encode_runs, _runs, mask_to_rle, rle_to_mask

CHUNK = 1 << 16  # the SDK splits runs longer than 2**16 values


def sdk_rle(mask: np.ndarray) -> list[int]:
    return mask2rle(mask.astype(np.uint8) * 255)


def sdk_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    return np.reshape(decode_rle(rle), (height, width, 4))[:, :, 3] > 0


def ellipse(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return ((xx - width * 0.45) / (width * 0.3)) ** 2 + ((yy - height * 0.55) / (height * 0.35)) ** 2 < 1


def runs_mask(height: int, width: int, pixel_runs: list[int], start: bool = False) -> np.ndarray:
    """A mask whose flattened pixels alternate between runs of the given lengths (the last run fills the rest)."""
    flat = np.zeros(height * width, dtype=bool)
    pos, value = 0, start
    for length in pixel_runs:
        flat[pos : pos + length] = value
        pos += length
        value = not value
    flat[pos:] = value
    return flat.reshape(height, width)


def _random_masks():
    rng = np.random.default_rng(1234)
    masks = {}
    for i, (h, w) in enumerate([(1, 2), (2, 1), (3, 5), (7, 7), (16, 9), (13, 31), (40, 25)]):
        for density in (0.1, 0.5, 0.9):
            masks[f"noise{i}-{h}x{w}-{density}"] = rng.random((h, w)) < density
    # blobs: runs of every length class (1, 2..8 pixels, longer) in one mask
    blobs = np.zeros((30, 70), dtype=bool)
    for _ in range(25):
        y, x = rng.integers(0, 30), rng.integers(0, 70)
        blobs[y : y + rng.integers(1, 8), x : x + rng.integers(1, 40)] = True
    masks["blobs"] = blobs
    return masks


MASKS = {
    **_random_masks(),
    "zeros": np.zeros((20, 30), dtype=bool),
    "ones": np.ones((20, 30), dtype=bool),
    "1x1-false": np.zeros((1, 1), dtype=bool),
    "1x1-true": np.ones((1, 1), dtype=bool),
    "single-row": np.array([[0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1]], dtype=bool),
    "single-column": np.array([[1], [1], [0], [1], [0], [0], [1]], dtype=bool),
    "long-row": np.arange(5000)[None, :] % 700 < 350,
    "long-column": (np.arange(3000) % 97 < 3)[:, None],
    # all-ones / all-zeros larger than one 2**16 chunk: 300x300 pixels = 360000 values
    "ones-300": np.ones((300, 300), dtype=bool),
    "zeros-300": np.zeros((300, 300), dtype=bool),
    # runs of exactly 16384 / 16385 pixels = 65536 / 65540 values, 32768 pixels = exactly two chunks
    "run-65536-values": runs_mask(200, 200, [100, 16384, 7, 16385, 3]),
    "run-65536-values-first": runs_mask(200, 200, [16384, 1, 16383, 2], start=True),
    "run-131072-values": runs_mask(256, 256, [1, 32768, 1, 32769]),
    "run-long-tail": runs_mask(300, 400, [5, 50000, 2, 70000, 1]),
    "ellipse-600x800": ellipse(600, 800),
    "ellipse-45x17": ellipse(45, 17),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_to_rle_is_byte_identical_to_sdk(name):
    mask = MASKS[name]
    ours = mask_to_rle(mask)
    assert isinstance(ours, list) and all(isinstance(b, int) for b in ours)
    assert ours == sdk_rle(mask)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_round_trip_through_our_decoder_and_the_sdk_decoder(name):
    mask = MASKS[name]
    h, w = mask.shape
    rle = mask_to_rle(mask)
    decoded = rle_to_mask(rle, h, w)
    assert decoded.shape == (h, w) and decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(sdk_decode(rle, h, w), mask)


def test_mask_to_rle_accepts_non_bool_masks_as_foreground_nonzero():
    mask = np.array([[0, 3, 255], [1, 0, 0]], dtype=np.uint8)
    assert mask_to_rle(mask) == sdk_rle(mask > 0)


def test_mask_to_rle_rejects_non_2d_input():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 4), dtype=bool))


def test_rle_to_mask_rejects_wrong_size():
    rle = mask_to_rle(np.ones((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="4x6"):
        rle_to_mask(rle, 4, 6)


def test_header_holds_value_count_and_format():
    rle = mask_to_rle(np.zeros((3, 7), dtype=bool))
    count = int.from_bytes(bytes(rle[:4]), "big")
    assert count == 3 * 7 * 4
    # 5 bits word size - 1 (7), then four 4-bit fields 2, 3, 7, 15 (sizes 3, 4, 8, 16)
    bits = "".join(f"{b:08b}" for b in rle)[32:53]
    assert bits == "00111" + "0010" + "0011" + "0111" + "1111"


# ---------------------------------------------------------------- the run encoder vs encode_rle


def encode_values(values: np.ndarray) -> list[int]:
    """mask_to_rle's run encoder on any byte values (masks only ever give it 0 and 255)."""
    values = np.asarray(values, dtype=np.uint8).ravel()
    lengths, vals = _runs(values)
    return _encode_runs(len(values), lengths, vals)


def array_from_runs(lengths: list[int], rng: np.random.Generator) -> np.ndarray:
    """Concatenate runs of the given lengths; neighbouring runs always differ in value."""
    parts, previous = [], -1
    for length in lengths:
        value = int(rng.integers(0, 256))
        while value == previous:
            value = int(rng.integers(0, 256))
        parts.append(np.full(length, value, dtype=np.uint8))
        previous = value
    return np.concatenate(parts)


RUN_CLASSES = {
    "ones": [1] * 40,
    "2-8": list(range(2, 9)) * 3,
    "9-16": list(range(9, 17)) * 2,
    "17-256": [17, 18, 100, 255, 256, 128, 200],
    "257+": [257, 258, 1000, 4096, 65535],
    "65536": [CHUNK, 1, CHUNK, 3],
    "65537": [CHUNK + 1, 2, CHUNK - 1],
    "over-65536": [70000, 1, 2 * CHUNK, 5, 2 * CHUNK + 1, 200000],
    "boundaries": [8, 9, 16, 17, 256, 257, 1, 1, 2],
}


@pytest.mark.parametrize("name", sorted(RUN_CLASSES))
def test_encode_values_identical_to_sdk_encode_rle(name):
    rng = np.random.default_rng(len(name))
    lengths = list(RUN_CLASSES[name])
    rng.shuffle(lengths)
    values = array_from_runs(lengths, rng)
    assert encode_values(values) == encode_rle(values)
    np.testing.assert_array_equal(decode_rle(encode_values(values)), values)


def test_encode_values_mixed_random_runs():
    rng = np.random.default_rng(7)
    lengths = []
    for _ in range(300):
        kind = rng.integers(0, 5)
        low, high = [(1, 2), (2, 9), (9, 17), (17, 257), (257, 3000)][kind]
        lengths.append(int(rng.integers(low, high)))
    values = array_from_runs(lengths, rng)
    assert encode_values(values) == encode_rle(values)


def test_encode_values_on_uniform_noise():
    values = np.random.default_rng(3).integers(0, 256, size=2000).astype(np.uint8)
    assert encode_values(values) == encode_rle(values)


@pytest.mark.parametrize("length", [1, 2, 8, 9, 16, 17, 256, 257, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1])
def test_encode_values_single_run(length):
    values = np.full(length, 255, dtype=np.uint8)
    assert encode_values(values) == encode_rle(values)
