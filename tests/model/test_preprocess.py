"""Preprocessing shared by training and serving: any camera image becomes the model's grey input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from model.preprocess import (
    ImageFormatError,
    cell_probabilities,
    cells_to_batch,
    dihedral_view,
    flatten_views,
    half_cell_shape,
    half_cell_views,
    image_views,
    is_half_cell,
    resize_cell,
    to_grey_u8,
)


def test_sixteen_bit_frames_are_stretched_not_truncated() -> None:
    frame = np.linspace(1000, 5000, 100 * 100).reshape(100, 100).astype(np.uint16)
    grey = to_grey_u8(frame)
    assert grey.dtype == np.uint8
    assert grey.min() == 0 and grey.max() == 255


def test_saturated_pixels_do_not_crush_the_module() -> None:
    # a module between 2000 and 4000 with 2 % of the frame saturated (hot pixels, a reflection)
    frame = np.linspace(2000, 4000, 200 * 200).reshape(200, 200).astype(np.uint16)
    frame.reshape(-1)[::50] = np.iinfo(np.uint16).max
    grey = to_grey_u8(frame)
    module = grey[frame < 65535]
    assert module.min() <= 5 and module.max() >= 250  # the module spans the grey levels


@pytest.mark.parametrize("ceiling", [4095, 16383, 65535])  # 12-, 14- and 16-bit sensors in uint16
def test_the_sensor_s_ceiling_is_read_off_the_frame(ceiling: int) -> None:
    frame = np.linspace(0.25 * ceiling, 0.5 * ceiling, 200 * 200).reshape(200, 200).astype(np.uint16)
    frame.reshape(-1)[::50] = ceiling  # 2 % saturated
    module = to_grey_u8(frame)[frame < ceiling]
    assert module.min() <= 5 and module.max() >= 250


def test_a_bright_plateau_is_the_top_of_the_range_not_saturation() -> None:
    # an 8-bit picture stored as 16 bits: its bright cells are the maximum and most of the frame
    frame = np.full((100, 100), 200 * 257, np.uint16)
    frame[40:60, 40:60] = 100 * 257  # a darker cell
    frame[:, ::10] = 20 * 257  # gaps
    grey = to_grey_u8(frame)
    assert grey[0, 1] == 255 and 0 < grey[50, 51] < 255  # the darker cell stays darker than the rest


def test_a_large_sixteen_bit_frame_is_converted_without_float_copies_of_it() -> None:
    import tracemalloc

    frame = np.random.default_rng(0).integers(0, 4096, (4000, 4000), dtype=np.uint16)  # 32 MB
    tracemalloc.start()
    try:
        grey = to_grey_u8(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the 16 MB answer, a sample and a band of rows at a time: not 64 MB float32 copies of the whole
    # frame, of which the conversion made four at once before (a 60 MP frame peaked at 1.2 GB)
    assert peak < 1.5 * frame.nbytes, f"peak {peak / 1e6:.0f} MB"
    assert grey.shape == frame.shape and grey.min() == 0 and grey.max() == 255


def test_colour_and_alpha_become_grey() -> None:
    rgb = np.full((10, 12, 3), 100, np.uint8)
    rgba = np.full((10, 12, 4), 100, np.uint8)
    assert to_grey_u8(rgb).shape == (10, 12)
    assert to_grey_u8(rgba).shape == (10, 12)


@pytest.mark.parametrize("shape", [(5, 5, 2), (5, 5, 5), (2, 2, 2, 2)])
def test_unconvertible_channel_layouts_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageFormatError, match="expected"):
        to_grey_u8(np.zeros(shape, np.uint8))


def test_flat_sixteen_bit_frame_is_black_not_an_error() -> None:
    assert to_grey_u8(np.full((4, 4), 777, np.uint16)).max() == 0


@settings(max_examples=25, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_resize_gives_the_model_size(cell: np.ndarray) -> None:
    assert resize_cell(cell, 32).shape == (32, 32)


def test_dihedral_views_are_the_eight_symmetries_of_the_square() -> None:
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    views = {dihedral_view(image, v).tobytes() for v in range(8)}
    assert len(views) == 8
    assert np.array_equal(dihedral_view(image, 0), image)
    with pytest.raises(ValueError, match=r"0\.\.7"):
        dihedral_view(image, 8)


def test_batch_layout_is_n_1_h_w_float() -> None:
    batch = cells_to_batch([np.zeros((8, 8), np.uint8)] * 3)
    assert batch.shape == (3, 1, 8, 8) and batch.dtype == np.float32


# --- half cells --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "half"),
    [
        (100, 100, False),
        (100, 71, False),
        (100, 70.5, True),
        (160, 80, True),
        (80, 170, True),
    ],
)
def test_an_outline_twice_as_long_as_wide_is_a_half_cell(width: float, height: float, half: bool) -> None:
    assert is_half_cell(width, height) is half
    assert not is_half_cell(0, 10)  # a degenerate outline is no cell at all


@given(size=st.integers(8, 64), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_half_cell_views_are_the_half_beside_its_mirror_across_each_long_side(size: int, seed: int) -> None:
    rows, cols = half_cell_shape(2, 1, size)
    half = np.random.default_rng(seed).integers(0, 256, (rows, cols), dtype=np.uint8)
    across_bottom, across_top = half_cell_views(half, size)
    assert across_bottom.shape == across_top.shape == (size, size)
    extra = size - rows
    np.testing.assert_array_equal(across_bottom[:rows], half)
    np.testing.assert_array_equal(across_bottom[rows:], half[::-1][:extra])  # row by row away from the side
    np.testing.assert_array_equal(across_top[extra:], half)
    np.testing.assert_array_equal(across_top[:extra], half[:extra][::-1])
    # a tall half is the same with the axes swapped
    tall = half_cell_views(np.ascontiguousarray(half.T), size)
    np.testing.assert_array_equal(tall, np.stack([across_bottom.T, across_top.T]))


def test_half_cell_of_the_wrong_shape_is_refused_naming_the_expected_one() -> None:
    with pytest.raises(ValueError, match=r"expected a half cell of \(150, 300\) pixels, got \(100, 300\)"):
        half_cell_views(np.zeros((100, 300), np.uint8), 300)


def test_image_views_judge_a_whole_cell_once_and_a_half_cell_twice() -> None:
    assert image_views(np.zeros((310, 290), np.uint8)).shape == (1, 300, 300)
    assert image_views(np.zeros((80, 160), np.uint8), 64).shape == (2, 64, 64)
    assert image_views(np.zeros((900, 400), np.uint8), 64).shape == (2, 64, 64)


def test_a_cell_takes_the_lowest_of_its_views_probabilities() -> None:
    flat, counts = flatten_views([np.zeros((1, 4, 4)), np.zeros((2, 4, 4)), np.zeros((1, 4, 4))])
    assert flat.shape == (4, 4, 4) and counts == [1, 2, 1]
    np.testing.assert_allclose(cell_probabilities(np.array([0.9, 0.8, 0.3, 0.1]), counts), [0.9, 0.3, 0.1])
    # a broken model output stays broken, for serving to refuse
    assert np.isnan(cell_probabilities(np.array([0.9, np.nan, 0.3, 0.1]), counts)[1])
    with pytest.raises(ValueError, match="expected 4 view probabilities for 3 cells, got 3"):
        cell_probabilities(np.array([0.9, 0.8, 0.3]), counts)
