"""memflow_nb: a Jupyter-first toolkit for MemFlow streaming text-to-video.

The public API is small; everything below is stable. Submodules and sub-packages (pipeline,
weights, decode, plots, text_encoder, memory, schedule, bench) hold the rest. Names are imported
on first use, so `import memflow_nb` is quick and the engine needs nothing but torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "config": ["ModelConfig", "StreamConfig"],
    "model": ["CausalWanModel"],
    "pipeline": ["Pipeline", "load"],
    "weights": ["load_dit"],
    "stream": ["State", "init_state", "step", "set_prompt", "update_memory", "state_to"],
    "timeline": ["Timeline", "TimelineError", "from_official_jsonl", "to_official_jsonl"],
    "generation": ["generate", "generate_video", "resume", "Checkpoint", "Checkpoints", "Chunk", "Video"],
    "decode": ["decode_chunk", "init_decode_state", "to_uint8"],
    "video": ["write_video", "read_video", "show_video"],
    "inspect": ["record_attention", "bank_slots", "bank_history", "bank_thumbnails"],
    "widgets": ["TimelineEditor"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memflow_nb' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
