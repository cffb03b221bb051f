"""Conformance helpers: the golden weight recipe and the golden-file runner.

The golden files in tests/data were produced by the official MemFlow code with random weights
made by `recipe_weights` (`memflow_nb.weights.build`). `run_golden` replays any DiT golden file
through the public API.
"""
from __future__ import annotations

import torch

from .weights.build import random_module, recipe_weights

__all__ = ["recipe_weights", "load_golden", "golden_stream_config", "run_golden"]


def load_golden(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata dict, tensors) of a golden .safetensors file (the JSON is stored under 'meta')."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "null") or "null")
    if meta is None:
        side = path.with_suffix(".json")
        if not side.exists():
            raise ValueError(f"{path}: no 'meta' metadata and no {side.name} beside it")
        meta = json.loads(side.read_text())
    return meta, load_file(str(path))


def golden_stream_config(meta: dict):
    """StreamConfig from a DiT golden's meta['stream'] and step list (official key names).

    meta['stream']['pipeline'] names the official pipeline: "interactive" (the default) or
    "single", whose bank replaces its pending record every chunk (`bank_record_every_chunk`).
    """
    from .engine.config import StreamConfig

    s = meta["stream"]
    pipeline = s.get("pipeline", "interactive")
    if pipeline not in ("interactive", "single"):
        raise ValueError(f"golden meta.stream.pipeline={pipeline!r}: expected 'interactive' "
                         "(interactive_inference.py) or 'single' (inference.py)")
    return StreamConfig(
        bank_record_every_chunk=pipeline == "single",
        chunk_frames=s.get("num_frame_per_block", 3), local_attn_size=s["local_attn_size"],
        sink_size=s["sink_size"], bank_size=s["bank_size"], record_interval=s["record_interval"],
        global_sink=s.get("global_sink", True), context_noise=s.get("context_noise", 0),
        timestep_shift=s.get("timestep_shift", 5.0), warp_denoising_steps=s.get("warp_denoising_step", True),
        sma=s.get("sma", False), denoising_steps=tuple(meta.get("denoising_step_list", (1000, 750, 500, 250))),
    )


def run_golden(path, *, device="cpu", dtype=torch.float32, compile: bool = False) -> torch.Tensor:
    """Replay a DiT golden file through the public API and return latents [B, F, C, H, W].

    The file gives the model config, stream settings, weight seed (weights come from
    `recipe_weights` over this model's parameter names), prompt embeddings, initial noise,
    re-noise draws and switch frame indices. Prompts switch with the official rule: before each
    chunk, if its start frame >= the next switch index, move to the next prompt (one per chunk).
    device / dtype / compile run the same case elsewhere (e.g. bf16 on a GPU) for accuracy checks;
    the result is returned as float32 on the CPU.
    """
    from .engine.config import ModelConfig
    from .engine.model import CausalWanModel
    from .engine.steps import init_state, set_prompt, step

    meta, t = load_golden(path)
    cfg = ModelConfig.from_dict(meta["config"])
    stream = golden_stream_config(meta)
    model = random_module(lambda: CausalWanModel(cfg), meta["weight_seed"], device=device, dtype=dtype)
    if compile:
        from .fast import optimize_model

        model = optimize_model(model, "exact", graphs=False)
    prompts = [t[f"prompt_embeds_{i}"] for i in range(len([k for k in t if k.startswith("prompt_embeds_")]))]
    noise, renoise = t["noise"], t["renoise"]
    B, n_frames = noise.shape[:2]
    lh, lw = meta["latent_hw"]
    n = stream.chunk_frames
    per_chunk = len(stream.denoising_steps) - 1
    switches = list(meta.get("switch_frame_indices", []))
    state = init_state(model, stream, prompts[0], height=lh * 8, width=lw * 8)
    segment, out = 0, []
    for c in range(n_frames // n):
        s = c * n
        if segment < len(switches) and s >= switches[segment]:
            segment += 1
            state = set_prompt(model, state, prompts[segment])
        rn = [renoise[per_chunk * c + i].reshape(B, n, *noise.shape[2:]) for i in range(per_chunk)]
        state, x0 = step(model, state, noise=noise[:, s:s + n], renoise=rn)
        out.append(x0.float().cpu())
    return torch.cat(out, dim=1)
