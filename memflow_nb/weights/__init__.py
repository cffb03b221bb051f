"""Weights: reading files safely, checking keys, building models, downloading what is missing.

    model = load_dit("MemFlow/base.pt", "MemFlow/lora.pt", device="cuda", dtype=torch.bfloat16)
    text = load_text_encoder("Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
                             "Wan2.1-T2V-1.3B/google/umt5-xxl", output_device="cuda")
    vae = load_vae("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", device="cuda")
    paths = fetch_weights(local_dir="/data/memflow")   # or memflow_nb.load(), which does all of it

Modules: errors (CheckpointError and its kinds), files (read_checkpoint), build (build on meta
then assign, key checks, the random-weight recipe), dit (load_dit, merge_lora, the merged
cache), text (load_text_encoder), decoders (load_vae, load_tae), download (fetch_weights).
"""
from .build import build_assigned, check_state_dict, meta_shapes, random_module, recipe_weights
from .decoders import load_tae, load_vae
from .dit import infer_dit_config, load_dit, merge_lora
from .download import REPOS, WeightPaths, fetch_tae, fetch_weights, hf_download_command
from .errors import CheckpointError, KeyMismatch, UnsafeCheckpoint, WeightsCorrupt, WeightsNotFound
from .files import read_checkpoint
from .text import load_text_encoder
from .text_file import infer_t5_config

__all__ = ["CheckpointError", "WeightsNotFound", "WeightsCorrupt", "UnsafeCheckpoint", "KeyMismatch",
           "read_checkpoint", "meta_shapes", "check_state_dict", "build_assigned", "recipe_weights",
           "random_module", "load_dit", "merge_lora", "infer_dit_config", "load_text_encoder", "infer_t5_config",
           "load_vae", "load_tae", "fetch_weights", "fetch_tae", "hf_download_command", "WeightPaths", "REPOS"]
