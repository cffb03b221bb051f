"""memflow_nb: a Jupyter-first toolkit for MemFlow streaming text-to-video.

The public API is small; everything below is stable. Submodules (plots, text_encoder, vae, io,
hub, memory, schedule) hold the rest.
"""
from .config import ModelConfig, StreamConfig
from .generate import Checkpoint, Checkpoints, Chunk, Video, generate, generate_video, resume
from .hub import Pipeline, load
from .inspect import bank_history, bank_slots, bank_thumbnails, record_attention
from .io import load_dit
from .model import CausalWanModel
from .stream import State, init_state, set_prompt, state_to, step, update_memory
from .timeline import Timeline, TimelineError, from_official_jsonl, to_official_jsonl
from .vae import decode_chunk, init_decode_state, to_uint8
from .video import read_video, show_video, write_video
from .widgets import TimelineEditor

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "StreamConfig", "CausalWanModel", "Pipeline", "load", "load_dit",
    "State", "init_state", "step", "set_prompt", "update_memory", "state_to",
    "Timeline", "TimelineError", "from_official_jsonl", "to_official_jsonl",
    "generate", "generate_video", "resume", "Checkpoint", "Checkpoints", "Chunk", "Video",
    "decode_chunk", "init_decode_state", "to_uint8", "write_video", "read_video", "show_video",
    "record_attention", "bank_slots", "bank_history", "bank_thumbnails", "TimelineEditor",
]
