"""Zoom windows, paste-back, merging and tiles: exact to the pixel."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from model.paste import input_mask_at_original, window_logits, window_mask
from model.prompts import Prompt, preprocess_shape, to_model
from model.tiles import TileObject, merge_tiles
from model.window_merge import merge, ownership
from model.windows import (Window, axis_cores, axis_positions, core_windows, grid_windows, levels, snap,
                           window_for_box)
from model.zoom import PATH_EDGES, PATH_WHOLE, PATH_ZOOM, PixelPrompt, ZoomConfig, answer, first_window

SIZE = (3648, 5472)  # (height, width) of the 20 MP photos the zoom path is for
S = 1024


# ---------------------------------------------------------------- grid and snapping

def test_axis_positions_are_half_side_multiples_plus_one_flush_with_the_border():
    assert axis_positions(5472, 1024) == [0, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 4448]
    assert axis_positions(1024, 1024) == [0]
    assert axis_positions(800, 1024) == [0]
    assert axis_positions(2048, 1024) == [0, 512, 1024]  # the last multiple already ends at the border


@pytest.mark.parametrize("length,side", [(5472, 1024), (3648, 256), (1000, 256), (700, 512), (512, 512)])
def test_axis_cores_partition_the_axis_and_sit_inside_their_window(length, side):
    starts, cores = axis_positions(length, side), axis_cores(length, side)
    assert cores[0][0] == 0 and cores[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    for start, (lo, hi) in zip(starts, cores):
        assert start <= lo < hi <= start + min(side, length)


def test_grid_windows_cover_the_image_and_have_the_encoders_long_side():
    windows = grid_windows(1024, SIZE, S)
    covered = np.zeros(SIZE, dtype=bool)
    for w in windows:
        assert w.width == w.height == 1024 and w.x1 <= SIZE[1] and w.y1 <= SIZE[0]
        assert w.input_size == (1024, 1024)
        covered[w.y0:w.y1, w.x0:w.x1] = True
    assert covered.all()
    assert len(windows) == 10 * 7


def test_neighbouring_clicks_snap_to_the_same_window():
    a = window_for_box((2000.5, 1500.5, 2000.5, 1500.5), SIZE, S, max_zoom=4)
    b = window_for_box((2030.5, 1490.5, 2030.5, 1490.5), SIZE, S, max_zoom=4)
    assert a == b == Window(1920, 1408, 256, 256, 256, S)
    assert a.zoom == 4 and a.cell_size() == 1.0


@pytest.mark.parametrize("seed", range(20))
def test_a_box_no_longer_than_half_a_side_always_fits_a_window_of_that_side(seed):
    rng = np.random.default_rng(seed)
    side = int(rng.choice([256, 512, 1024]))
    w, h = rng.uniform(1, side / 2, 2)
    x0, y0 = rng.uniform(0, SIZE[1] - w), rng.uniform(0, SIZE[0] - h)
    found = snap((x0, y0, x0 + w, y0 + h), side, SIZE, S)
    assert found is not None and found.side == side
    assert found.x0 <= x0 and found.y0 <= y0 and found.x1 >= x0 + w and found.y1 >= y0 + h
    assert found.x0 % (side // 2) == 0 or found.x1 == SIZE[1]
    assert found.y0 % (side // 2) == 0 or found.y1 == SIZE[0]


def test_the_most_zoomed_window_that_holds_the_object_with_context():
    pit = (3000.0, 2000.0, 3012.0, 2012.0)  # 12 px
    assert window_for_box(pit, SIZE, S, max_zoom=4).side == 256
    assert window_for_box(pit, SIZE, S, max_zoom=2).side == 512  # bounded by the maximum zoom
    blemish = (3000.0, 2000.0, 3300.0, 2150.0)  # 300 px + 75 px context each side: 450 fits 512 or 1024
    assert window_for_box(blemish, SIZE, S, max_zoom=4).side in (512, 1024)
    assert window_for_box((0.0, 0.0, 1500.0, 900.0), SIZE, S, max_zoom=4) is None  # larger than native
    assert levels(SIZE, S, 4) == [256, 512, 1024]
    assert levels((800, 1000), S, 4) == [256, 512]  # never as long as the image


def test_core_windows_finds_the_window_each_pixel_belongs_to():
    found = core_windows(np.array([[10, 10], [5471, 3647], [300, 10]]), 256, SIZE, S)
    assert [(w.x0, w.y0) for w in found] == [(0, 0), (128, 0), (5216, 3392)]  # 300 is nearer 256 than 384


# ---------------------------------------------------------------- crop and coordinates

def test_crop_is_the_windows_pixels():
    image = np.arange(60 * 80).reshape(60, 80)
    w = Window(16, 8, 32, 32, 32, 128)
    assert np.array_equal(w.crop(image), image[8:40, 16:48])
    assert w.input_size == (128, 128) and w.scale == (4.0, 4.0)


def test_coordinates_map_to_the_window_frame_and_back():
    w = Window(1920, 1408, 256, 256, 256, S)
    # the centre of full-resolution pixel (1920, 1408) is 4 input pixels of the zoomed frame wide
    assert np.allclose(w.to_frame([[1920.5, 1408.5]]), [[2.0, 2.0]])
    assert np.allclose(w.to_frame([[2176.0, 1664.0]]), [[1024.0, 1024.0]])
    pts = np.random.default_rng(0).uniform([1920, 1408], [2176, 1664], (50, 2))
    assert np.allclose(w.from_frame(w.to_frame(pts)), pts)
    assert np.allclose(w.box_to_frame((1900, 1400, 2000, 1500)), [0, 0, 320, 368])  # clipped to the window
    assert w.box_to_frame((0, 0, 100, 100)) is None


def test_the_whole_image_window_maps_prompts_as_the_whole_image_path_does():
    whole = Window.whole(SIZE, S)
    assert whole.input_size == preprocess_shape(*SIZE) == (683, 1024)
    prompt = Prompt(((0.3, 0.7),), (1,), box=(0.1, 0.2, 0.5, 0.6))
    pixel = PixelPrompt.from_prompt(prompt, SIZE)
    model = to_model(prompt, whole.input_size)
    assert np.allclose(whole.to_frame(pixel.points), model.points, atol=1e-3)
    assert np.allclose(whole.box_to_frame(pixel.box), model.box, atol=1e-3)


def test_a_clamped_window_at_a_short_image_side_keeps_the_encoders_long_side():
    w = snap((100, 100, 200, 200), 4096, SIZE, S)
    assert (w.width, w.height) == (4096, 3648) and w.input_size == (912, 1024)


# ---------------------------------------------------------------- paste-back

def test_paste_back_at_one_pixel_per_cell_is_the_grid_itself():
    rng = np.random.default_rng(1)
    pattern = rng.random((256, 256)) > 0.5
    low = np.where(pattern, 3.0, -3.0).astype(np.float32)
    w = Window(1920, 1408, 256, 256, 256, S)
    assert np.array_equal(window_mask(low, w), pattern)
    # a part of the window: the same pixels
    assert np.array_equal(window_mask(low, w, (1930, 1410, 2000, 1500)), pattern[2:92, 10:80])


def test_paste_back_at_two_pixels_per_cell_gives_each_cell_a_2x2_block():
    rng = np.random.default_rng(2)
    pattern = rng.random((256, 256)) > 0.5
    low = np.where(pattern, 1.0, -1.0).astype(np.float32)
    w = Window(1024, 512, 512, 512, 512, S)
    assert np.array_equal(window_mask(low, w), np.kron(pattern, np.ones((2, 2), dtype=bool)))


def test_paste_back_of_a_native_window_is_cv2s_linear_resize():
    low = np.random.default_rng(3).normal(0, 5, (256, 256)).astype(np.float32)
    w = Window(512, 0, 1024, 1024, 1024, S)
    expected = cv2.resize(low, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    assert np.abs(window_logits(low, w) - expected).max() < 1e-4


def test_paste_back_of_a_non_square_window_samples_its_own_grid_rows():
    # a 4096 x 3648 window: its input is 1024 x 912, so grid rows 0-227 hold pixels (16 px cells)
    # and rows 228+ are padding below the image
    low = np.full((256, 256), -5.0, dtype=np.float32)
    low[226:228, :] = 5.0
    w = Window(0, 0, 4096, 3648, 4096, S)
    assert w.input_size == (912, 1024) and w.scale == (0.25, 0.25)
    mask = window_mask(low, w, (1520, 3500, 1680, 3648))
    expected = np.zeros((148, 160), dtype=bool)
    expected[116:] = True  # rows 3616-3647: from half a cell before row 226's centre to the image's end
    assert np.array_equal(mask, expected)


def test_nearest_upscale_of_an_input_mask_keeps_pixel_centres():
    small = np.zeros((4, 4), dtype=bool)
    small[1, 2] = True
    big = input_mask_at_original(small, (8, 8))
    assert np.array_equal(np.argwhere(big), [[2, 4], [2, 5], [3, 4], [3, 5]])


# ---------------------------------------------------------------- merging windows

def test_ownership_on_the_grid_is_each_windows_core_and_partitions_the_union():
    size = (1000, 1300)
    windows = grid_windows(256, size, S)
    owned = ownership(windows, size)
    count = np.zeros(size, dtype=int)
    xc, yc = axis_cores(1300, 256), axis_cores(1000, 256)
    for w, own in zip(windows, owned):
        count[w.y0:w.y1, w.x0:w.x1] += own
        (lo_x, hi_x), = [c for s, c in zip(axis_positions(1300, 256), xc) if s == w.x0]
        (lo_y, hi_y), = [c for s, c in zip(axis_positions(1000, 256), yc) if s == w.y0]
        expected = np.zeros(own.shape, dtype=bool)
        expected[lo_y - w.y0:hi_y - w.y0, lo_x - w.x0:hi_x - w.x0] = True
        assert np.array_equal(own, expected)
    assert (count == 1).all()


def test_overlapping_windows_split_at_the_middle_of_their_overlap():
    size = (256, 1024)
    a, b = Window(0, 0, 256, 256, 256, S), Window(128, 0, 256, 256, 256, S)
    merged = merge([(a, np.ones((256, 256), bool)), (b, np.zeros((256, 256), bool))], size)
    # a's right edge is at 256, b's left edge at 128: a pixel goes to a up to x = 191, to b from 192
    assert merged[:, :192].all() and not merged[:, 192:].any()


def test_a_line_across_three_windows_merges_into_the_exact_line():
    size = (600, 900)
    truth = np.zeros(size, dtype=bool)
    cv2.line(truth.view(np.uint8), (5, 300), (890, 310), 1, 1)
    windows = [Window(0, 172, 256, 256, 256, S), Window(256, 172, 256, 256, 256, S),
               Window(512, 172, 256, 256, 256, S), Window(644, 172, 256, 256, 256, S)]
    pieces = [(w, w.crop(truth).copy()) for w in windows]  # each as a perfect decoder sees it
    merged = merge(pieces, size)
    assert np.array_equal(merged, truth)


def test_merge_keeps_the_base_outside_the_windows():
    size = (300, 300)
    base = np.zeros(size, dtype=bool)
    base[10:20, 10:20] = True
    w = Window(100, 100, 64, 64, 64, 256)
    merged = merge([(w, np.ones((64, 64), bool))], size, base)
    assert merged[10:20, 10:20].all() and merged[100:164, 100:164].all()
    assert np.count_nonzero(merged) == 100 + 64 * 64


# ---------------------------------------------------------------- the zoom path with a perfect stand-in

class PerfectDecoder:
    """Returns, for any window, the truth's mean over each low-res cell (1 px cells: the truth itself).
    The low-res grid is a quarter of the input side, as SAM's (256 for 1024)."""

    def __init__(self, truth: np.ndarray, input_side: int):
        self.truth, self.input_side, self.embedded = truth, input_side, []
        self.grid = input_side // 4

    def embed(self, window: Window) -> np.ndarray:
        self.embedded.append(window)
        cell = 4 / window.scale[0]
        crop = window.crop(self.truth).astype(np.float32)
        k = int(round(cell))
        assert abs(cell - k) < 1e-9, "this stand-in handles whole-pixel cells only"
        h, w = crop.shape
        cov = crop[: h // k * k, : w // k * k].reshape(h // k, k, w // k, k).mean((1, 3))
        low = np.zeros((self.grid, self.grid), np.float32)
        low[: cov.shape[0], : cov.shape[1]] = cov
        return (low - 0.5) * 20

    @staticmethod
    def decode(embedding, prompt):
        return embedding, 0.9


def test_a_crack_longer_than_a_window_is_traced_and_merged_exactly():
    size, side = (1024, 2048), 256  # input side 256: a 2048 px image, windows of 64 px at zoom 4
    truth = np.zeros(size, dtype=bool)
    cv2.line(truth.view(np.uint8), (100, 500), (1900, 650), 1, 2)
    stand_in = PerfectDecoder(truth, side)
    whole_low = np.full((64, 64), -10.0, np.float32)  # invisible on the whole image
    found = answer(PixelPrompt(np.array([[1000.5, 575.5]]), np.array([1]), None), size, side, ZoomConfig(max_windows=200),
                   stand_in.embed, stand_in.decode, lambda: (whole_low, 0.5))
    assert found.path == PATH_ZOOM and found.windows[0].side == 64
    assert 50 < len(found.windows) < 200 and len(set(stand_in.embedded)) == len(stand_in.embedded)
    assert np.array_equal(found.mask, truth)


def test_the_window_budget_bounds_the_trace():
    size, side = (1024, 2048), 256
    truth = np.zeros(size, dtype=bool)
    cv2.line(truth.view(np.uint8), (100, 500), (1900, 650), 1, 2)
    stand_in = PerfectDecoder(truth, side)
    found = answer(PixelPrompt(np.array([[1000.5, 575.5]]), np.array([1]), None), size, side, ZoomConfig(max_windows=5),
                   stand_in.embed, stand_in.decode, lambda: (np.full((64, 64), -10.0, np.float32), 0.5))
    assert len(found.windows) == 5 and not (found.mask & ~truth).any()


def test_a_small_box_is_answered_on_one_window_without_the_whole_image():
    truth = np.zeros(SIZE, dtype=bool)
    cv2.circle(truth.view(np.uint8), (3000, 2000), 6, 1, -1)
    stand_in = PerfectDecoder(truth, S)

    def whole():
        raise AssertionError("a small box needs no whole-image answer")

    found = answer(PixelPrompt(np.zeros((0, 2)), np.zeros(0, np.int64), np.array([2990.0, 1990, 3010, 2010])), SIZE, S,
                   ZoomConfig(), stand_in.embed, stand_in.decode, whole)
    assert found.path == PATH_ZOOM and len(found.windows) == 1 and np.array_equal(found.mask, truth)


def test_a_large_object_keeps_the_whole_answer_inside_and_gets_its_edges_from_native_windows():
    truth = np.zeros(SIZE, dtype=bool)
    cv2.ellipse(truth.view(np.uint8), (2000, 1500), (1000, 700), 20, 0, 360, 1, -1)
    stand_in = PerfectDecoder(truth, S)
    whole = Window.whole(SIZE, S)
    # the whole-image answer: the truth seen through 21 px cells (cv2's area average onto the 1024 frame)
    in_h, in_w = whole.input_size
    frame = cv2.resize(truth.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_AREA)
    low = np.zeros((256, 256), np.float32)
    low[: (in_h + 3) // 4, :] = cv2.resize(frame, (256, (in_h + 3) // 4), interpolation=cv2.INTER_AREA)
    found = answer(PixelPrompt(np.array([[2000.5, 1500.5]]), np.array([1]), None), SIZE, S, ZoomConfig(max_windows=64),
                   stand_in.embed, stand_in.decode, lambda: ((low - 0.5) * 20, 0.9))
    assert found.path == PATH_EDGES and all(w.side == S for w in found.windows)
    errors = np.count_nonzero(found.mask != truth)
    assert errors < 0.001 * np.count_nonzero(truth)  # only where the whole answer's edge was off by > 1/4 window


def test_clicks_on_an_object_too_large_for_a_window_keep_the_whole_image_path_when_edges_are_off():
    low = np.full((256, 256), -10.0, np.float32)
    low[20:150, 20:200] = 10.0
    found = answer(PixelPrompt(np.array([[2000.5, 1500.5]]), np.array([1]), None), SIZE, S, ZoomConfig(edges=False),
                   lambda w: None, lambda e, p: (None, 0.0), lambda: (low, 0.8))
    assert found.path == PATH_WHOLE and found.mask is None and found.whole_logits is low


def test_first_window_uses_the_extent_of_the_whole_answer_under_the_click():
    low = np.full((256, 256), -10.0, np.float32)
    low[100:103, 100:104] = 10.0  # a blemish-sized answer (about 85 x 64 px at 21 px per cell)
    whole = Window.whole(SIZE, S)
    from model.zoom import frame_mask

    mask = frame_mask(low, whole)
    ys, xs = np.nonzero(mask)
    click = whole.from_frame(np.array([[xs.mean(), ys.mean()]]))
    w = first_window(PixelPrompt(click, np.array([1]), None), SIZE, S, ZoomConfig(), mask)
    extent = whole.from_frame(np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.max() + 1]]))
    assert w is not None and w.side in (256, 512)
    assert w.x0 <= extent[0, 0] and w.x1 >= extent[1, 0] and w.y0 <= extent[0, 1] and w.y1 >= extent[1, 1]


# ---------------------------------------------------------------- tiles

def test_an_object_across_a_tile_border_is_one_object_and_min_area_counts_it_whole():
    size = (512, 768)
    tiles = grid_windows(256, size, S)
    truth = np.zeros(size, dtype=bool)
    truth[200:230, 100:700] = True  # 600 x 30, across many tiles
    # every tile sees the part of it inside the tile (a perfect segmenter per tile)
    objects = [TileObject(t, t.crop(truth).copy(), 0.9) for t in tiles if t.crop(truth).any()]
    assert len(objects) > 3
    pieces_alone = [np.count_nonzero(o.mask) for o in objects]
    min_area = 600 * 30 - 1  # larger than any one tile's piece, smaller than the object
    assert max(pieces_alone) < min_area
    merged = merge_tiles(objects, size, min_area=min_area)
    assert len(merged) == 1
    assert np.array_equal(merged[0].full(size), truth)


def test_tiles_keep_separate_objects_apart_and_drop_small_ones_after_merging():
    size = (512, 768)
    tiles = grid_windows(256, size, S)
    big = np.zeros(size, dtype=bool)
    big[40:90, 100:400] = True
    small = np.zeros(size, dtype=bool)
    small[400:405, 600:606] = True
    objects = []
    for t in tiles:
        for truth in (big, small):
            if t.crop(truth).any():
                objects.append(TileObject(t, t.crop(truth).copy(), 0.8))
    merged = merge_tiles(objects, size, min_area=31)
    assert len(merged) == 1 and np.array_equal(merged[0].full(size), big)
    both = merge_tiles(objects, size, min_area=30)
    assert len(both) == 2 and np.array_equal(both[1].full(size), small)


def test_an_object_only_one_tile_saw_keeps_its_pixels_where_the_other_tile_decides():
    size = (256, 384)
    a, b = Window(0, 0, 256, 256, 256, S), Window(128, 0, 256, 256, 256, S)
    truth = np.zeros(size, dtype=bool)
    truth[100:120, 150:250] = True  # across the split at x = 192
    merged = merge_tiles([TileObject(a, a.crop(truth).copy(), 0.9)], size)  # b found nothing
    assert len(merged) == 1 and np.array_equal(merged[0].full(size), truth)


def test_a_thin_line_in_a_box_that_fits_a_native_window_is_looked_at_again_at_the_finest_zoom():
    truth = np.zeros(SIZE, dtype=bool)
    cv2.line(truth.view(np.uint8), (2000, 1500), (2350, 1620), 1, 1)  # 1-2 px: half-lost on 4 px cells
    stand_in = PerfectDecoder(truth, S)
    ys, xs = np.nonzero(truth)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    found = answer(PixelPrompt(np.zeros((0, 2)), np.zeros(0, np.int64), box), SIZE, S, ZoomConfig(),
                   stand_in.embed, stand_in.decode, lambda: (_ for _ in ()).throw(AssertionError("not needed")))
    assert stand_in.embedded[0].side == 1024  # the box fits a native window: looked at there first
    assert found.path == PATH_ZOOM and all(w.side == 256 for w in found.windows)
    assert np.array_equal(found.mask, truth)
