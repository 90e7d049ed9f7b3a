"""Resampling a ViT's learned position embeddings to another patch grid, as HF's
``interpolate_pos_encoding`` (``torch.nn.functional.interpolate``, bicubic): a checkpoint
trained at one image size is loaded at another (``hf.load_pretrained(..., image_size=...)``)."""
from __future__ import annotations

import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights (a = -0.75, torch's choice) for taps at -1, 0, 1, 2."""
    x = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, far)


def _bicubic_axis(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    src = (np.arange(out, dtype=np.float64) + 0.5) * (n / out) - 0.5
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)  # [out, 4]
    y = 0.0
    for j in range(4):
        idx = np.clip(i0 - 1 + j, 0, n - 1)
        shape = [1] * x.ndim
        shape[axis] = out
        y = y + np.take(x, idx, axis=axis) * w[:, j].reshape(shape)
    return y


def resize_pos_embed(pos: np.ndarray, new_grid: int) -> np.ndarray:
    """Resizes [1 + g*g, D] position embeddings to [1 + new_grid^2, D].

    The patch grid is resampled bicubically exactly as HF's ``interpolate_pos_encoding``
    (``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``): separable Keys
    cubic with a = -0.75, half-pixel centres, edge-clamped taps, no antialiasing.
    """
    n, d = pos.shape[0] - 1, pos.shape[1]
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"position embeddings have {n} patch positions, not a square grid")
    grid = pos[1:].reshape(g, g, d).astype(np.float64)
    grid = _bicubic_axis(_bicubic_axis(grid, new_grid, 0), new_grid, 1)
    return np.concatenate([pos[:1], grid.reshape(new_grid * new_grid, d).astype(pos.dtype)], 0)
