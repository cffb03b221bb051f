"""Per-chunk noise: chunk c of a stream draws from a generator seeded by (seed, c) alone."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def chunk_noise(seed: int, chunk: int, shape: Sequence[int], count: int) -> list[torch.Tensor]:
    """`count` standard-normal float32 CPU tensors for one chunk, from a generator seeded by (seed, chunk).

    The same (seed, chunk) gives the same bits on every machine; no chunk's noise depends on another's.
    """
    g = torch.Generator().manual_seed(_mix_seed(seed, chunk))
    return [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for _ in range(count)]


def _mix_seed(seed: int, chunk: int) -> int:
    # splitmix64 of the pair: decorrelated streams, stable across platforms and torch versions.
    z = (seed * 0x9E3779B97F4A7C15 + chunk + 1) & 0xFFFFFFFFFFFFFFFF
    for m in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB):
        z = ((z ^ (z >> 30 if m == 0xBF58476D1CE4E5B9 else z >> 27)) * m) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def step_noise(seed: int, chunk: int, shape: Sequence[int], noise: Optional[torch.Tensor],
               renoise: Optional[Sequence[torch.Tensor]], n_renoise: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The initial noise and the `n_renoise` re-noise draws of one chunk, on `device` in `dtype`.

    Given tensors are used (any layout with shape's element count); missing ones are drawn from
    (seed, chunk) with `chunk_noise`.
    """
    if noise is None or (renoise is None and n_renoise > 0):
        drawn = chunk_noise(seed, chunk, shape, 1 + n_renoise)
        noise = drawn[0] if noise is None else noise
        renoise = drawn[1:] if renoise is None else renoise
    renoise = list(renoise) if renoise is not None else []
    if len(renoise) < n_renoise:
        raise ValueError(f"renoise needs {n_renoise} tensors (one per step transition), got {len(renoise)}")

    def fit(t, name):
        t = torch.as_tensor(t)
        if t.numel() != math.prod(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        t = t.reshape(shape)
        if device.type == "cuda" and t.device.type == "cpu":
            # Pinned memory makes the upload asynchronous: no stall of the GPU queue per chunk.
            return t.to(dtype).pin_memory().to(device, non_blocking=True)
        return t.to(device, dtype)

    return fit(noise, "noise"), [fit(r, f"renoise[{i}]") for i, r in enumerate(renoise[:n_renoise])]
