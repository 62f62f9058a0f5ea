"""Camera-like batch augmentations: shapes and ranges kept, each one bounded by its amplitude, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.preprocess import dihedral_view
from training.augment import (
    CameraAugment,
    camera_batch,
    dihedral_batch,
    noise_batch,
    resample_batch,
    shading_batch,
    window_batch,
)

SIDE = 64


def blob_batch(n: int = 6) -> torch.Tensor:
    """Dark cells with one bright 8 px square at the centre."""
    x = torch.zeros(n, 1, SIDE, SIDE)
    x[:, :, 28:36, 28:36] = 200.0
    return x


def centroid(x: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(float(SIDE)), torch.arange(float(SIDE)), indexing="ij")
    mass = x[:, 0].sum(dim=(1, 2))
    return torch.stack([(x[:, 0] * ys).sum(dim=(1, 2)) / mass, (x[:, 0] * xs).sum(dim=(1, 2)) / mass], 1)


def test_dihedral_batch_matches_the_numpy_views() -> None:
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    for view in range(8):
        got = dihedral_batch(x, torch.full((2,), view))
        np.testing.assert_array_equal(got.numpy(), dihedral_view(x.numpy(), view))


def test_nothing_enabled_changes_nothing() -> None:
    augment = CameraAugment()
    assert not augment.enabled
    x = blob_batch()
    assert torch.equal(camera_batch(x, augment, torch.Generator().manual_seed(0)), x)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(0.0, 0.2), seed=st.integers(0, 2**16))
def test_window_shift_moves_the_content_by_at_most_the_amplitude(shift: float, seed: int) -> None:
    x = blob_batch()
    moved = window_batch(x, CameraAugment(shift=shift), torch.Generator().manual_seed(seed))
    offset = (centroid(moved) - centroid(x)).abs()
    assert float(offset.max()) <= shift * SIDE + 0.5


def test_window_scale_and_rotation_keep_the_centre() -> None:
    x = blob_batch()
    moved = window_batch(x, CameraAugment(scale=0.2, rotate_degrees=20), torch.Generator().manual_seed(1))
    assert float((centroid(moved) - centroid(x)).abs().max()) < 0.5
    assert not torch.allclose(moved, x)


def test_resampling_blurs_fine_detail_and_keeps_flat_areas() -> None:
    checker = ((torch.arange(SIDE)[:, None] + torch.arange(SIDE)[None, :]) % 2 * 255.0).expand(
        2, 1, SIDE, SIDE
    )
    blurred = resample_batch(checker.clone(), 0.5, torch.Generator().manual_seed(0))
    assert float(blurred.std()) < 0.5 * float(checker.std())
    flat = torch.full((2, 1, SIDE, SIDE), 120.0)
    assert torch.allclose(resample_batch(flat, 0.5, torch.Generator().manual_seed(0)), flat, atol=1e-3)


@pytest.mark.parametrize("amplitude", [0.1, 0.4])
def test_shading_darkens_by_at_most_its_amplitude(amplitude: float) -> None:
    flat = torch.full((16, 1, SIDE, SIDE), 100.0)
    shaded = shading_batch(flat, amplitude, torch.Generator().manual_seed(2))
    assert float(shaded.max()) <= 100.0 + 1e-3
    assert float(shaded.min()) >= 100.0 * (1 - amplitude) - 1e-3


def test_noise_stays_in_range_and_is_seeded() -> None:
    flat = torch.full((8, 1, SIDE, SIDE), 128.0)
    first = noise_batch(flat, 6.0, torch.Generator().manual_seed(3))
    again = noise_batch(flat, 6.0, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert 0 < float((first - flat).std()) < 6.0


def test_everything_together_keeps_shape_and_grey_range() -> None:
    augment = CameraAugment(
        shift=0.03, scale=0.06, rotate_degrees=3, resample_min=0.6, shading=0.2, noise_sigma=6
    )
    x = torch.rand(4, 1, SIDE, SIDE) * 255
    y = camera_batch(x, augment, torch.Generator().manual_seed(4))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0 and float(y.max()) <= 255
