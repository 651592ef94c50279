"""Batched, on-device image augmentation: random crop with zero padding and horizontal flip.

One gather over the whole batch (no Python loop per image); works on uint8 or float images on any
device. The random parameters are drawn separately (:func:`sample_crop_flip`) so that a caller can
draw them on a CPU generator, reproducibly on every device, and apply them anywhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sample_crop_flip", "crop_flip", "random_crop_flip"]


def sample_crop_flip(n: int, pad: int, flip: bool = True, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop offsets and flips for ``n`` images: ``(dy, dx, flips)``.

    ``dy``, ``dx``: int64 in ``[0, 2 * pad]`` (the crop's top-left corner in the padded image);
    ``flips``: bool. Drawn in this order with ``torch.randint`` on ``generator`` (on the
    generator's device; ``device`` when no generator is given); ``flips`` is all False, and draws
    nothing, when ``flip`` is False."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if generator is not None:
        device = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=dy.device)
    return dy, dx, flips


def crop_flip(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor,
              flips: torch.Tensor) -> torch.Tensor:
    """Crop and flip each image of ``x [B, C, H, W]`` with the given parameters.

    With ``xp`` = ``x`` zero-padded by ``pad`` on every side:
    ``out[i, :, r, c] = xp[i, :, dy[i] + r, dx[i] + (W - 1 - c if flips[i] else c)]``, i.e. a
    random crop of the padded image followed by a horizontal flip. Same dtype, shape and device."""
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if b == 0:
        return x.clone()
    dev = x.device
    dy = dy.to(dev, torch.long)
    dx = dx.to(dev, torch.long)
    flips = flips.to(dev, torch.bool)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    wp = w + 2 * pad
    rows = dy[:, None] + torch.arange(h, device=dev)                                  # [B, H]
    col = torch.arange(w, device=dev)
    cols = dx[:, None] + torch.where(flips[:, None], (w - 1) - col, col)              # [B, W]
    lin = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w)                # [B, 1, HW]
    out = xp.reshape(b, c, -1).gather(2, lin.expand(b, c, h * w))
    return out.view(b, c, h, w)


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`crop_flip` with parameters from :func:`sample_crop_flip` (on ``generator``, or the
    default generator of ``x``'s device)."""
    dy, dx, flips = sample_crop_flip(x.shape[0], pad, flip, generator,
                                     device=None if generator is not None else x.device)
    return crop_flip(x, pad, dy, dx, flips)
