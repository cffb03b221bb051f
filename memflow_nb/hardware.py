"""What a memory plan runs on: a GPU's memory and compute capability, and the host's memory.

    Hardware.current()          # this machine's free GPU memory and available host RAM
    PRESETS["t4"]               # cards people have (USERS.md), for plans made elsewhere
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

GB = 1e9  # plans count in GB of 1e9 bytes, as the card makers and PERF.md do


@dataclass(frozen=True)
class Hardware:
    """What a plan runs on. gpu_bytes 0: no GPU. host_bytes None: unknown (not checked)."""

    name: str
    gpu_bytes: int
    capability: Optional[tuple[int, int]]
    host_bytes: Optional[int]
    measured: bool = False  # free memory read from this machine, rather than a card's size

    @classmethod
    def current(cls, device: Union[str, torch.device, None] = None) -> "Hardware":
        """This machine: free memory of `device` (default cuda if available) and available host RAM."""
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        host = _host_available()
        if device.type != "cuda":
            return cls("this machine (CPU)", 0, None, host, measured=True)
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but torch sees no CUDA GPU; use device='cpu'")
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # our cache is free to us
        return cls(torch.cuda.get_device_name(device), int(free), tuple(torch.cuda.get_device_capability(device)),
                   host, measured=True)


# Cards people have (USERS.md). Host RAM: free Colab 12.7 GB; Colab's L4 runtime about 53 GB; a
# desktop with a 24 GB card 32 GB (an assumption); the H200 machine of our benchmarks 128 GB.
PRESETS = {
    "t4": Hardware("T4 (free Colab)", int(15 * GB), (7, 5), int(12.7 * GB)),
    "l4": Hardware("L4 (Colab)", int(22.5 * GB), (8, 9), int(53 * GB)),
    "24gb": Hardware("24 GB card (4090-class)", int(24 * GB), (8, 9), int(32 * GB)),
    "h200": Hardware("H200", int(139 * GB), (9, 0), int(128 * GB)),
    "cpu": Hardware("CPU only", 0, None, int(16 * GB)),
}


def _host_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
