"""Random weights in MemFlow's real files: the real names, shapes, dtypes and containers.

    python -m memflow_nb.fake_weights DIR [--device cuda] [--scale full|tiny]

writes the `load(local_dir=DIR)` layout (README, Weights):

    DIR/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth   bf16, Wan's umT5 names
    DIR/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth                    fp32, encoder and decoder (194 tensors)
    DIR/Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer.json    a word-level tokenizer of umT5's vocab size
    DIR/MemFlow/base.pt                                   {"generator": {"model.<name>": bf16}}
    DIR/MemFlow/lora.pt                                   {"generator_lora": PEFT rank-256 factors}

For measuring memory and speed where the real files cannot be downloaded (the device runs of
BENCHMARKS.md): the numbers are random, the sizes and the loading work are the real ones. The
names come from our own modules built on the meta device and from tests/data's key lists, which
were read from the official code.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
LORA_RANK = 256


def _random_like(shape, dtype, device, generator) -> torch.Tensor:
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=generator)
    if len(shape) > 1:
        t /= math.sqrt(math.prod(shape[1:]))
    else:
        t = 1.0 + 0.02 * t  # norms and biases near their trained scale: keeps fp16 activations finite
    return t.to(dtype).cpu()


def _write(path: Path, obj) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path.stat().st_size


def _shapes(module_fn) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = module_fn()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _tensors(shapes: dict, dtype, device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {name: _random_like(shape, dtype, device, g) for name, shape in sorted(shapes.items())}


def tokenizer_json(vocab_size: int) -> dict:
    """A word-level tokenizer.json with `<pad>`=0, `</s>`=1, `<unk>`=2 and `vocab_size` entries in all:
    whitespace-split words map to ids by a fixed word list, so any prompt tokenizes (mostly `<unk>`)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for t, i in (("<pad>", 0), ("</s>", 1), ("<unk>", 2))],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                           "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def lora_shapes(dit_shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, int]]:
    """PEFT LoRA factors for every attention and FFN linear of the DiT blocks (MemFlow's lora.pt targets)."""
    out = {}
    for name, shape in dit_shapes.items():
        if name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2 and (
                "_attn." in name or ".ffn." in name):
            key = "base_model.model." + name[: -len(".weight")]
            out[key + ".lora_A.weight"] = (rank, shape[1])
            out[key + ".lora_B.weight"] = (shape[0], rank)
    return out


def make_weight_files(root, *, device: str = "cpu", scale: str = "full", seed: int = 0) -> dict[str, int]:
    """Write the five files under `root`; returns {relative path: bytes}. scale="tiny" shrinks the DiT
    and the umT5 encoder (same names, small widths) for a quick check of the whole loading path."""
    from .engine.config import ModelConfig
    from .engine.model import CausalWanModel
    from .text_encoder import T5Config, UMT5Encoder

    root = Path(root)
    wan, mf = root / "Wan2.1-T2V-1.3B", root / "MemFlow"
    if scale == "full":
        dit_cfg, t5_cfg = ModelConfig.from_name("wan2.1-t2v-1.3b"), T5Config.from_name("umt5-xxl")
        rank = LORA_RANK
    elif scale == "tiny":
        dit_cfg = ModelConfig.from_name("tiny")
        t5_cfg = T5Config(vocab=1000, dim=dit_cfg.text_dim, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
                          num_buckets=32)
        rank = 8
    else:
        raise ValueError(f"scale={scale!r}: use 'full' or 'tiny'")
    sizes = {}
    dit = _tensors(_shapes(lambda: CausalWanModel(dit_cfg)), torch.bfloat16, device, seed)
    sizes["MemFlow/base.pt"] = _write(mf / "base.pt", {"generator": {"model." + k: v for k, v in dit.items()}})
    lora = {name: (torch.randn(shape, dtype=torch.bfloat16) / shape[1] if ".lora_A." in name
                   else torch.zeros(shape, dtype=torch.bfloat16))  # B = 0 as PEFT starts: the merge costs the same
            for name, shape in lora_shapes({k: tuple(v.shape) for k, v in dit.items()}, rank).items()}
    del dit
    sizes["MemFlow/lora.pt"] = _write(mf / "lora.pt", {"generator_lora": lora})
    del lora
    vae_shapes = json.loads((DATA / "recipe_keys.json").read_text())["vae"]
    sizes["Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"] = _write(
        wan / "Wan2.1_VAE.pth", _tensors({k: tuple(v) for k, v in vae_shapes.items()}, torch.float32, device, seed + 1))
    t5 = _tensors(_shapes(lambda: UMT5Encoder(t5_cfg)), torch.bfloat16, device, seed + 2)
    sizes["Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"] = _write(
        wan / "models_t5_umt5-xxl-enc-bf16.pth", t5)
    del t5
    tok = wan / "google" / "umt5-xxl" / "tokenizer.json"
    tok.parent.mkdir(parents=True, exist_ok=True)
    tok.write_text(json.dumps(tokenizer_json(t5_cfg.vocab)))
    sizes["Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer.json"] = tok.stat().st_size
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m memflow_nb.fake_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is faster)")
    p.add_argument("--scale", default="full", choices=["full", "tiny"])
    args = p.parse_args(argv)
    for name, size in make_weight_files(args.root, device=args.device, scale=args.scale).items():
        print(f"{size / 1e9:8.3f} GB  {args.root / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
