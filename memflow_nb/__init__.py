"""memflow_nb: a Jupyter-first toolkit for MemFlow streaming text-to-video.

The public API is small; everything below is stable. Submodules and sub-packages (engine, fast,
recording, interventions, pipeline, weights, decode, timeline, notebook, text_encoder, planning,
batch, bench) hold the rest. Names are imported on first use, so `import memflow_nb` is quick and
the engine needs nothing but torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "engine.config": ["ModelConfig", "StreamConfig"],
    "engine.model": ["CausalWanModel"],
    "pipeline": ["Pipeline", "load"],
    "weights": ["load_dit"],
    "engine.state": ["State", "state_to"],
    "engine.steps": ["init_state", "step", "set_prompt", "update_memory"],
    "timeline.model": ["Timeline", "TimelineError"],
    "timeline.official": ["from_official_jsonl", "to_official_jsonl"],
    "generation": ["generate", "generate_video", "resume", "Chunk", "Video", "Session"],
    "checkpoints": ["Checkpoint", "Checkpoints"],
    "decode": ["decode_chunk", "init_decode_state", "to_uint8"],
    "video": ["write_video", "read_video", "show_video"],
    "recording": ["record_attention", "bank_slots", "bank_history", "bank_thumbnails"],
    "interventions": ["pin", "unpin", "evict", "replace_slot", "inject_image", "inject_latents", "ablate"],
    "decode.encoder": ["load_vae_encoder"],
    "notebook.editor": ["TimelineEditor"],
    "prompt_coach": ["coach", "apply_suggestion"],
    "prompt_extend": ["extend_prompt"],
    "planning": ["plan", "Plan", "PlanError"],
    "batch": ["run_study"],
}
_SUBMODULES = {"plots": "notebook.plots"}  # `from memflow_nb import plots`: the figures for notebooks
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = import_module(f".{_SUBMODULES[name]}", __name__)
    else:
        raise AttributeError(f"module 'memflow_nb' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
