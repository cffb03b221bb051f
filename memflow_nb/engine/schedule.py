"""Flow-matching noise schedule: the shifted timestep table, step warping and the x0 / re-noise maths.

Matches the official FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) with 1000 train
steps: sigma_i = 1 - i/1000 (i = 0..999), shifted to shift*s / (1 + (shift-1)*s), timestep = 1000*sigma.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .config import StreamConfig


@lru_cache(maxsize=8)
def _table(shift: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    sigmas = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas * n


def sigma_table(shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps), both float32 [num_train_timesteps], descending."""
    s, t = _table(float(shift), int(num_train_timesteps))
    return s.clone(), t.clone()


def lookup_sigma(t: float, shift: float, num_train_timesteps: int = 1000) -> float:
    """Sigma of the table entry nearest to timestep t (the official argmin lookup)."""
    sigmas, timesteps = _table(float(shift), int(num_train_timesteps))
    idx = int(torch.argmin((timesteps.double() - float(t)).abs()))
    return float(sigmas[idx])


@dataclass(frozen=True)
class Step:
    timestep: float  # value fed to the time embedding
    sigma: float  # noise level x_t = (1 - sigma) x0 + sigma eps


def denoising_schedule(stream: StreamConfig) -> tuple[Step, ...]:
    """The per-chunk denoising steps. With warping, step s is entry 1000 - s of the table.

    Defaults give timesteps [1000, 937.5, 833.33, 625] (sigmas equal to timesteps / 1000).
    """
    n = stream.num_train_timesteps
    sigmas, timesteps = _table(float(stream.timestep_shift), n)
    out = []
    for s in stream.denoising_steps:
        t = float(torch.cat([timesteps, timesteps.new_zeros(1)])[n - s]) if stream.warp_denoising_steps else float(s)
        out.append(Step(timestep=t, sigma=lookup_sigma(t, stream.timestep_shift, n)))
    return tuple(out)


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x_t - sigma * (noise - x0 prediction), in float64 like the official wrapper."""
    return (x_t.double() - sigma * flow.double()).to(flow.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Forward diffusion to level sigma: (1 - sigma) x0 + sigma noise (float32 sigma, result in noise's dtype)."""
    # A 1-element (not 0-d) float32 tensor, so bf16 latents are promoted to float32 as officially.
    s = torch.tensor([sigma], dtype=torch.float32, device=x0.device)
    return ((1 - s) * x0 + s * noise).to(noise.dtype)
