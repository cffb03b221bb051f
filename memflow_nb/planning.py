"""A memory plan you can read before loading: where each piece lives, in which dtype, how many bytes.

    p = memflow_nb.plan(gpu_gb=15, host_gb=12.7, capability=(7, 5), height=480, width=832)  # a T4
    p.fits, p.dtype, p.peak_gpu_bytes, p.peak_host_bytes
    print(p)                      # a short table, and the fixes when it does not fit
    memflow_nb.plan()             # this machine, MemFlow's size 480x832

Sizes come from `memflow_nb.footprint` (formulas over the configs), as rows of `memflow_nb.plan_rows`. Peaks are taken per phase,
since the big transients never overlap: a chunk (attention workspace and the chunk's keys and
values), the VAE decode, a prompt switch (the KV re-cache), and text encoding. The resident
pieces (weights, the stream state and the VAE's decode state that a stream holds between chunks)
count in every phase. `python -m memflow_nb.planning --gpu t4` prints the plan of a named card.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch

from . import footprint as fp
from .engine.config import StreamConfig, latent_size
from .fast.fp8 import FP8_CAPABILITY
from .hardware import GB, PRESETS, Hardware
from .plan_rows import Component, Job, Knobs, components, short_dtype
from .precision import DtypeLike, resolve_dtype

DEFAULT_SIZES = {"memflow": (480, 832), "tiny": (64, 112)}  # as Pipeline.default_size
# Memory the tensors do not account for. Described hardware (gpu_gb=...): the CUDA context with
# cuBLAS/cuDNN (about 0.5 GB) and, on the host, Python + torch + the CUDA libraries (about 2 GB;
# 1 GB without a GPU). Measured free memory (this machine) already excludes what exists now.
GPU_RUNTIME = {"described": 0.5 * GB, "measured": 0.3 * GB}
HOST_RUNTIME = {"described": 2.0 * GB, "measured": 1.0 * GB, "cpu": 1.0 * GB}
# Caching-allocator rounding and fragmentation, and what the components do not list (temporaries
# of the generate path), as a fraction of the allocated peak: measured on an H200 emulating a T4,
# an L4 and a 24 GB card (BENCHMARKS.md, Small GPUs), where peaks ran 8-15 % over the listed sum.
GPU_SLACK = 0.20
CHECKPOINT_SHARE = 0.5  # "auto" checkpoints may use this share of the host memory left over
PHASES = ("chunk", "decode", "prompt switch", "encode")


class PlanError(ValueError):
    """The plan does not fit; the message names the component, by how much, and the fixes."""

    def __init__(self, plan: "Plan"):
        super().__init__(plan.message)
        self.plan = plan


@dataclass(frozen=True)
class Plan:
    """Where everything lives and whether it fits. Knob values are those `load` takes (see plan_for_load)."""

    name: str
    height: int
    width: int
    batch: int
    hardware: Hardware
    device: str  # "cuda" or "cpu": where the DiT, the VAE and the stream live
    dtype: torch.dtype
    fp8_dit: bool
    vae_per_frame: bool
    text_encoder_device: str  # "gpu" (resident), "streamed" (block by block from the file) or "cpu"
    text_encoder_dtype: torch.dtype
    checkpoints_every: int
    max_checkpoints: int  # checkpoints that fit the host budget (besides chunk 0's, which is tiny); -1: no limit known
    checkpoint_bytes: int
    components: tuple[Component, ...]
    peak_gpu_bytes: int
    peak_gpu_phase: str
    peak_host_bytes: int
    peak_host_phase: str
    fits: bool
    problems: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()
    configs: Optional[tuple] = field(default=None, repr=False, compare=False)  # (DiT, T5, VAE) planned for

    def resized(self, height: int, width: int) -> "Plan":
        """The same plan (hardware, configs, knobs as chosen) for another video size."""
        return plan(self.name, height=height, width=width, batch=self.batch, hardware=self.hardware,
                    device=self.device, dtype=self.dtype, fp8_dit=self.fp8_dit, vae_per_frame=self.vae_per_frame,
                    text_encoder_device=self.text_encoder_device, text_encoder_dtype=self.text_encoder_dtype,
                    configs=self.configs)

    @property
    def message(self) -> str:
        """Why it does not fit and what fixes it (empty when it fits)."""
        if self.fits:
            return ""
        head = f"{self.name} at {self.height}x{self.width} (batch {self.batch}) does not fit on {self.hardware.name}"
        return "\n".join([head + ":"] + [f"  {p}" for p in self.problems] + ["fixes:"]
                         + [f"  {f}" for f in self.fixes])

    def check(self) -> "Plan":
        """Raise PlanError (a ValueError) with `message` unless the plan fits; return self."""
        if not self.fits:
            raise PlanError(self)
        return self

    def load_kwargs(self) -> dict:
        """The knobs as `load` takes them."""
        return dict(dtype=self.dtype, fp8_dit=self.fp8_dit, vae_per_frame=self.vae_per_frame,
                    text_encoder_device=self.text_encoder_device, text_encoder_dtype=self.text_encoder_dtype)

    def __str__(self) -> str:
        hw = self.hardware
        gpu = f"GPU {hw.gpu_bytes / GB:.1f} GB, capability {hw.capability[0]}.{hw.capability[1]}" \
            if hw.gpu_bytes else "no GPU"
        host = f"{hw.host_bytes / GB:.1f} GB" if hw.host_bytes is not None else "unknown"
        every = "every chunk" if self.checkpoints_every == 1 else f"every {self.checkpoints_every} chunks"
        room = "no limit known" if self.max_checkpoints < 0 else f"room for {self.max_checkpoints}"
        lines = [f"plan: {self.name} {self.height}x{self.width}, batch {self.batch}, on {hw.name} ({gpu}, host {host})",
                 f"dtype {short_dtype(self.dtype)}, fp8 DiT {'on' if self.fp8_dit else 'off'}, text encoder "
                 f"{self.text_encoder_device} ({short_dtype(self.text_encoder_dtype)}), VAE decode "
                 f"{'per frame' if self.vae_per_frame else 'whole chunk'}, checkpoints {every} ({room})",
                 f"  {'component':<26}{'where':<6}{'dtype':<10}{'GB':>7}  when"]
        for c in self.components:
            lines.append(f"  {c.name:<26}{c.where:<6}{c.dtype:<10}{c.bytes / GB:>7.2f}  {c.phase}"
                         + (f" ({c.note})" if c.note else ""))
        if self.device == "cuda":
            lines.append(f"peak GPU {self.peak_gpu_bytes / GB:.1f} GB of {hw.gpu_bytes / GB:.1f} "
                         f"({self.peak_gpu_phase})")
        lines.append(f"peak host {self.peak_host_bytes / GB:.1f} GB of {host} ({self.peak_host_phase})")
        lines.append("fits" if self.fits else "DOES NOT FIT\n" + self.message)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Plan({self.name} {self.height}x{self.width}, {self.hardware.name}, dtype={short_dtype(self.dtype)}, "
                f"peak_gpu={self.peak_gpu_bytes / GB:.1f} GB, peak_host={self.peak_host_bytes / GB:.1f} GB, "
                f"fits={self.fits})")


# -- building a plan ----------------------------------------------------------------------------

def _text_dtypes(job: Job, placement: str) -> tuple[torch.dtype, ...]:
    """Text-encoder dtypes to try: on the GPU the compute dtype; on the CPU float32 (fast where bf16
    is emulated) and, if that does not fit, bf16 (half of umT5-XXL's 22.7 GB)."""
    if job.text_dtype is None or job.text_dtype == "auto":
        return (job.dtype,) if placement != "cpu" else (torch.float32, torch.bfloat16)
    runs_on = "cuda" if placement != "cpu" and job.device == "cuda" else "cpu"
    return (resolve_dtype(job.text_dtype, runs_on, job.hardware.capability, name="text_encoder_dtype"),)


def _text_choices(job: Job, placements) -> list[tuple[str, torch.dtype]]:
    """(placement, dtype) pairs in the order tried, float32 ones first: on a CPU one block at a time
    in float32 beats a whole copy in emulated bf16 (USERS.md)."""
    pairs = [(t, d) for t in placements for d in _text_dtypes(job, t)]
    return sorted(pairs, key=lambda pair: pair[1] != torch.float32)


def _peak(rows: list[Component], where: str) -> tuple[int, str]:
    always = sum(c.bytes for c in rows if c.where == where and c.phase == "always")
    totals = {ph: always + sum(c.bytes for c in rows if c.where == where and c.phase == ph) for ph in PHASES}
    phase = max(PHASES, key=lambda ph: totals[ph])
    return totals[phase], (phase if totals[phase] > always else "always")


def _build(job: Job, k: Knobs) -> Plan:
    hw = job.hardware
    rows, ckpt, every = components(job, k)
    kind = "measured" if hw.measured else "described"
    rows.append(Component("runtime", "host", "-", int(HOST_RUNTIME[kind if job.device == "cuda" else "cpu"]),
                          "always", "Python, torch, CUDA libraries"))
    if job.device == "cuda":
        alloc, _ = _peak(rows, "gpu")
        rows.append(Component("CUDA context + slack", "gpu", "-", int(GPU_RUNTIME[kind] + GPU_SLACK * alloc),
                              "always", f"context, allocator slack {GPU_SLACK:.0%}"))
    host_peak, _ = _peak(rows, "host")
    if k.checkpoints_gb == "auto":
        n = None if hw.host_bytes is None else max(0, int((hw.host_bytes - host_peak) * CHECKPOINT_SHARE // ckpt))
    else:
        n = int(float(k.checkpoints_gb) * GB // ckpt)
    if n:
        rows.append(Component("checkpoints", "host", short_dtype(job.dtype), n * ckpt, "always",
                              f"{n} x {ckpt / GB:.2f} GB, " + ("every chunk" if every == 1 else f"every {every} chunks")))
    gpu, gpu_phase = _peak(rows, "gpu") if job.device == "cuda" else (0, "-")
    host, host_phase = _peak(rows, "host")
    problems = []
    if job.device == "cuda" and gpu > hw.gpu_bytes:
        problems.append(_over("GPU", rows, "gpu", gpu, gpu_phase, hw.gpu_bytes))
    if hw.host_bytes is not None and host > hw.host_bytes:
        problems.append(_over("host", rows, "host", host, host_phase, hw.host_bytes))
    return Plan(job.name, job.height, job.width, job.batch, hw, job.device, job.dtype, k.fp8_dit, k.vae_per_frame,
                k.text_encoder_device, k.text_encoder_dtype, every,
                -1 if n is None else n, ckpt, tuple(rows), gpu, gpu_phase, host, host_phase, not problems,
                tuple(problems), configs=job.cfgs)


def _over(side: str, rows, where: str, peak: int, phase: str, have: int) -> str:
    """'GPU: 17.4 GB at its peak (chunk), 2.4 GB over the 15.0 GB; the largest parts: ...'"""
    live = [c for c in rows if c.where == where and c.phase in ("always", phase)]
    live.sort(key=lambda c: (c.phase == "always", -c.bytes))  # this phase's own pieces first
    parts = ", ".join(f"{c.name} {c.bytes / GB:.2f} GB" for c in live[:4])
    return (f"{side}: {peak / GB:.1f} GB at its peak ({phase}) is {(peak - have) / GB:.1f} GB over the "
            f"{have / GB:.1f} GB there; largest parts: {parts}")


def _overage(p: Plan) -> int:
    hw = p.hardware
    gpu = max(0, p.peak_gpu_bytes - hw.gpu_bytes) if p.device == "cuda" else 0
    return gpu + (max(0, p.peak_host_bytes - hw.host_bytes) if hw.host_bytes is not None else 0)


def _choose(job: Job, options: dict) -> Plan:
    """The first plan that fits, trying the knobs left on "auto" from least to most change (text
    encoder streamed, then per-frame VAE decode, then fp8 weights); else the one least over."""
    best = None
    texts = _text_choices(job, options["text_encoder_device"])
    for fp8, per_frame, (text, text_dtype) in itertools.product(options["fp8_dit"], options["vae_per_frame"], texts):
        p = _build(job, Knobs(fp8, per_frame, text, text_dtype, options["checkpoints_gb"]))
        if p.fits:
            return p
        best = p if best is None or _overage(p) < _overage(best) else best
    return best


def _options(job: Job, fp8_dit, vae_per_frame, text_encoder_device, checkpoints_gb) -> dict:
    hw, cuda = job.hardware, job.device == "cuda"
    fp8_ok = cuda and tuple(hw.capability) >= FP8_CAPABILITY
    if fp8_dit is True and not fp8_ok:
        have = f"this GPU has {hw.capability[0]}.{hw.capability[1]}" if cuda else "the plan runs on the CPU"
        raise ValueError(f"fp8_dit=True: fp8 needs compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+ "
                         f"({have}); use fp8_dit=False")
    text = {"cuda": "gpu"}.get(text_encoder_device, text_encoder_device)
    if text not in ("auto", "gpu", "streamed", "cpu"):
        raise ValueError(f"text_encoder_device={text_encoder_device!r}; use 'auto', 'gpu', 'streamed' or 'cpu'")
    if text == "gpu" and not cuda:
        raise ValueError(f"text_encoder_device={text_encoder_device!r} needs a GPU; this plan has none (use 'cpu' or 'streamed')")
    if not (checkpoints_gb == "auto" or (isinstance(checkpoints_gb, (int, float)) and checkpoints_gb >= 0)):
        raise ValueError(f"checkpoints_gb={checkpoints_gb!r}; use 'auto' or a number of GB >= 0")
    auto = lambda v, choices: choices if v == "auto" else (bool(v),)  # noqa: E731
    return {"fp8_dit": auto(fp8_dit, (False, True) if fp8_ok else (False,)),
            "vae_per_frame": auto(vae_per_frame, (False, True)),
            "text_encoder_device": (("gpu", "streamed") if cuda else ("cpu", "streamed")) if text == "auto" else (text,),
            "checkpoints_gb": checkpoints_gb}


def smaller_sizes(height: int, width: int) -> Iterator[tuple[int, int]]:
    """(height, width) of the same shape below height x width, largest first: height in steps of 16
    pixels, width rounded to a multiple of 16."""
    for h in range(height - 16, 15, -16):
        yield h, max(16, round(width * h / height / 16) * 16)


def _fixes(job: Job, options: dict, p: Plan) -> tuple[str, ...]:
    """What would make `p` fit (or come closer), each with the peaks it gives."""
    def says(label, q):
        verdict = "fits" if q.fits else f"still {_overage(q) / GB:.1f} GB over"
        return f"{label}: peak GPU {q.peak_gpu_bytes / GB:.1f} GB, host {q.peak_host_bytes / GB:.1f} GB ({verdict})"

    out, cuda = [], job.device == "cuda"
    fp8_ok = cuda and tuple(job.hardware.capability) >= FP8_CAPABILITY
    if cuda and not p.fp8_dit and not fp8_ok:
        out.append(f"fp8 DiT weights: not on this GPU (fp8 needs compute capability "
                   f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}+)")
    tries = [("text_encoder_device", ("streamed",), True), ("vae_per_frame", (True,), True),
             ("fp8_dit", (True,), fp8_ok), ("checkpoints_gb", 0, options["checkpoints_gb"] != "auto")]
    for key, value, possible in tries:
        if possible and getattr(p, key, None) not in (value if isinstance(value, tuple) else (value,)):
            q = _choose(job, {**options, key: value})
            if _overage(q) < _overage(p):
                out.append(says(f"{key}={(value[0] if isinstance(value, tuple) else value)!r}", q))
    for key, value in (("batch", 1), ("prompt_switches", False)):
        q = _choose(dataclasses.replace(job, **{key: value}), options)
        if getattr(job, key) != value and _overage(q) < _overage(p):
            out.append(says(f"{key}={value}" + (" (one prompt, no re-cache)" if key == "prompt_switches" else ""), q))
    q = p
    for h, w in smaller_sizes(job.height, job.width):  # the largest that fits
        q = _choose(dataclasses.replace(job, height=h, width=w), options)
        if q.fits:
            out.append(says(f"height={h}, width={w}", q))
            break
    if not q.fits:
        out.append(f"no size fits: even at {q.height}x{q.width} the peak is GPU {q.peak_gpu_bytes / GB:.1f} GB, "
                   f"host {q.peak_host_bytes / GB:.1f} GB (the weights and runtime alone); use a larger machine")
    return tuple(out)


def plan(name: str = "memflow", *, height: Optional[int] = None, width: Optional[int] = None, batch: int = 1,
         gpu_gb: Optional[float] = None, host_gb: Optional[float] = None, capability: Optional[tuple[int, int]] = None,
         hardware: Optional[Hardware] = None, device: Union[str, torch.device, None] = None,
         dtype: DtypeLike = "auto", fp8_dit: Union[bool, str] = False, vae_per_frame: Union[bool, str] = "auto",
         text_encoder_device: str = "auto", text_encoder_dtype: DtypeLike = "auto",
         checkpoints_gb: Union[str, float] = "auto", seconds: Optional[float] = None,
         prompt_switches: bool = True, stream: Optional[StreamConfig] = None, configs=None) -> Plan:
    """The memory plan of pipeline `name` ("memflow" or "tiny") making height x width video.

    Hardware: `hardware`, or gpu_gb / capability / host_gb (GB = 1e9 bytes; gpu_gb=0: no GPU), or by
    default this machine's free memory (`Hardware.current`). height, width: default 480x832 for
    MemFlow (64x112 for tiny). dtype "auto": bf16 on capability >= 8.0, fp16 below, fp32 on the CPU.
    Knobs ("auto" tries the options until the plan fits): fp8_dit (DiT linears in fp8, capability
    8.9+; default off: it changes the numbers), vae_per_frame, text_encoder_device ("gpu" resident,
    "streamed" block by block from the file, on the GPU or the CPU, "cpu"), checkpoints_gb (host
    memory for resume checkpoints; "auto": half of what is left). seconds: count the frames
    `generate_video` keeps for a video this long. prompt_switches=False: a single-prompt stream,
    which never runs the KV re-cache of a switch.
    configs: (ModelConfig, T5Config, VAEConfig) read off the files being loaded, instead of the
    named pipeline's (what `load` passes, so a plan always matches the weights it places).
    Returns a frozen Plan; `.check()` raises PlanError when it does not fit.
    """
    if hardware is None:
        if gpu_gb is None and capability is None and host_gb is None:
            hardware = Hardware.current(device)
        else:
            gpu = 0 if gpu_gb is None else int(gpu_gb * GB)
            if gpu and capability is None:
                raise ValueError("capability=(major, minor) is needed with gpu_gb (e.g. (7, 5) for a T4)")
            host = None if host_gb is None else int(host_gb * GB)
            hardware = Hardware(f"a {gpu_gb:g} GB GPU" if gpu else "a CPU", gpu, tuple(capability) if gpu else None,
                                host)
    dev = "cuda" if hardware.gpu_bytes > 0 and (device is None or torch.device(device).type == "cuda") else "cpu"
    dh, dw = DEFAULT_SIZES.get(name, (480, 832))
    height, width = height or dh, width or dw
    latent_size(height, width)  # validates the size
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be a positive integer")
    job = Job(name, tuple(configs) if configs is not None else fp.configs(name), stream or StreamConfig(), height, width, batch, hardware, dev,
               resolve_dtype(dtype, dev, hardware.capability), text_encoder_dtype, seconds, bool(prompt_switches))
    options = _options(job, fp8_dit, vae_per_frame, text_encoder_device, checkpoints_gb)
    p = _choose(job, options)
    return p if p.fits else dataclasses.replace(p, fixes=_fixes(job, options, p))


def plan_for_load(name: str, device: Union[str, torch.device, None], dtype: DtypeLike = "auto", *,
                  check: bool = True, **knobs) -> Plan:
    """The plan `load` follows, on this machine's free memory (or `hardware=` if given).

    Call it first thing in `load`, before any file is read: it raises PlanError (a ValueError) with
    the component, the overage and the fixes when nothing fits (check=False returns the plan).
    Without height and width, a default size that does not fit is lowered (same shape, steps of
    16 pixels) to the largest that does.
    knobs: height, width, batch, fp8_dit, vae_per_frame, text_encoder_device, text_encoder_dtype,
    checkpoints_gb, seconds, prompt_switches, stream, hardware, as for `plan`.
    """
    p = plan(name, device=device, dtype=dtype, **knobs)
    if not p.fits and knobs.get("height") is None and knobs.get("width") is None:
        # No size was asked for: take the largest of the default's shape that fits (a T4 gets
        # 448x784 rather than a refusal); `load` says so, and pipe.default_size follows it.
        for h, w in smaller_sizes(p.height, p.width):
            q = plan(name, device=device, dtype=dtype, **{**knobs, "height": h, "width": w})
            if q.fits:
                return q
    return p.check() if check else p


def _main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m memflow_nb.planning", description="Print memory plans.")
    ap.add_argument("--gpu", default="this", help=f"this, or a card: {', '.join(PRESETS)}, or 'all'")
    ap.add_argument("--name", default="memflow", choices=("memflow", "tiny"))
    ap.add_argument("--sizes", default="480x832,320x576", help="HEIGHTxWIDTH,...")
    ap.add_argument("--fp8", default="false", choices=("false", "true", "auto"))
    args = ap.parse_args(argv)
    cards = list(PRESETS) if args.gpu == "all" else [args.gpu]
    fp8 = {"false": False, "true": True, "auto": "auto"}[args.fp8]
    for card in cards:
        hw = None if card == "this" else PRESETS[card]
        for size in args.sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            print(plan(args.name, height=h, width=w, hardware=hw, fp8_dit=fp8), end="\n\n")


if __name__ == "__main__":
    _main()
