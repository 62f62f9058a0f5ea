"""Batch augmentations of grey cells (N, 1, H, W), raw grey levels 0..255, on whatever device holds them.

Owns: what a cell may look like after a line camera and the module geometry have handled it, so that
the classifier's verdict does not hinge on it: the 8 symmetries of the square, brightness/contrast, a
small misplacement of the cutting window (shift, scale, rotation), the blur of being imaged smaller than
300 px and resampled back, shading across the cell (vignetting) and sensor noise. Every draw comes from
the caller's generator, so a seeded run repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CameraAugment:
    """Amplitudes of the camera-like augmentations; 0 (or 1 for `resample_min`) turns one off."""

    shift: float = 0.0  # largest offset of the cutting window, as a fraction of the cell side
    scale: float = 0.0  # largest relative change of the window's size
    rotate_degrees: float = 0.0
    resample_min: float = 1.0  # smallest size, relative to the input, the cell was imaged at
    shading: float = 0.0  # largest brightness fall across the cell (fraction)
    noise_sigma: float = 0.0  # largest Gaussian noise sigma, grey levels

    @property
    def enabled(self) -> bool:
        return self != CameraAugment()


def dihedral_batch(x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Apply view v (0..7: rotation by 90*v, flipped when v >= 4) to each sample of (N, C, H, W)."""
    out = torch.empty_like(x)
    for v in range(8):
        chosen = views == v
        if chosen.any():
            y = torch.rot90(x[chosen], k=v % 4, dims=(-2, -1))
            out[chosen] = torch.flip(y, dims=(-1,)) if v >= 4 else y
    return out


def uniform(n: int, amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """n draws from U(-amplitude, amplitude), on the CPU (the generator's device)."""
    return amplitude * (2 * torch.rand(n, generator=generator) - 1)


def jitter_batch(x: torch.Tensor, amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """Random contrast (scale about the cell's mean) and brightness on raw grey levels 0..255."""
    if amplitude <= 0:
        return x
    n = x.shape[0]
    contrast = (1 + uniform(n, amplitude, generator)).view(n, 1, 1, 1)
    brightness = (uniform(n, amplitude * 64, generator)).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast.to(x.device) + mean + brightness.to(x.device)).clamp(0, 255)


def window_batch(x: torch.Tensor, augment: CameraAugment, generator: torch.Generator) -> torch.Tensor:
    """Re-cut each cell through a slightly shifted, scaled and rotated window.

    Outside the original cell is black, as the dark gap between cells is on a module.
    """
    n = x.shape[0]
    angle = uniform(n, math.radians(augment.rotate_degrees), generator)
    zoom = 1 + uniform(n, augment.scale, generator)
    # affine_grid works in [-1, 1] coordinates: a shift of s cell sides is 2 s there
    tx, ty = uniform(n, 2 * augment.shift, generator), uniform(n, 2 * augment.shift, generator)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resample_batch(x: torch.Tensor, smallest: float, generator: torch.Generator) -> torch.Tensor:
    """The blur of a cell imaged at a smaller size and resampled back: area down, bilinear up.

    One size per batch keeps it a single pair of resizes; over an epoch every size is seen.
    """
    side = x.shape[-1]
    factor = float(smallest + (1 - smallest) * torch.rand(1, generator=generator))
    small = max(8, round(side * factor))
    if small >= side:
        return x
    down = F.interpolate(x, size=(small, small), mode="area")
    return F.interpolate(down, size=x.shape[-2:], mode="bilinear", align_corners=False)


def shading_batch(x: torch.Tensor, amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness falling linearly across the cell in a random direction, by up to `amplitude`."""
    n, _, h, w = x.shape
    direction = 2 * math.pi * torch.rand(n, generator=generator)
    depth = amplitude * torch.rand(n, generator=generator)
    ys = torch.linspace(-0.5, 0.5, h).view(1, h, 1)
    xs = torch.linspace(-0.5, 0.5, w).view(1, 1, w)
    cos, sin = torch.cos(direction).view(n, 1, 1), torch.sin(direction).view(n, 1, 1)
    reach = (cos.abs() + sin.abs()) / 2  # the ramp's extent along that direction
    ramp = (cos * xs + sin * ys + reach) / (2 * reach)  # 0 at the brightest corner, 1 at the darkest
    gain = 1 - depth.view(n, 1, 1) * ramp
    return x * gain[:, None].to(x.device, x.dtype)


def noise_batch(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    sigmas = (sigma * torch.rand(n, generator=generator)).view(n, 1, 1, 1).to(x.device, x.dtype)
    # the noise is drawn where the batch lives (a whole batch of it on the CPU slows a GPU run), from a
    # generator seeded by the run's CPU generator, so a run stays reproducible
    local = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    noise = torch.randn(x.shape, generator=local, device=x.device, dtype=x.dtype)
    return (x + noise * sigmas).clamp(0, 255)


def camera_batch(x: torch.Tensor, augment: CameraAugment, generator: torch.Generator) -> torch.Tensor:
    """All camera-like augmentations of `augment`, in the order a camera and the cutter apply them."""
    if augment.shading:
        x = shading_batch(x, augment.shading, generator)
    if augment.resample_min < 1:
        x = resample_batch(x, augment.resample_min, generator)
    if augment.shift or augment.scale or augment.rotate_degrees:
        x = window_batch(x, augment, generator)
    if augment.noise_sigma:
        x = noise_batch(x, augment.noise_sigma, generator)
    return x.clamp(0, 255)
