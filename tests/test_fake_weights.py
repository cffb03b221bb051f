"""The device runs' weight files have the real names and shapes, and load like the real ones."""
import json
from pathlib import Path

import torch

import memflow_nb as mf
from memflow_nb.engine.config import ModelConfig
from memflow_nb.fake_weights import LORA_RANK, _shapes, lora_shapes, make_weight_files
from memflow_nb.engine.model import CausalWanModel

DATA = Path(__file__).parent / "data"


def test_full_size_names_and_shapes_are_the_official_ones():
    keys = json.loads((DATA / "checkpoint_keys.json").read_text())
    dit = _shapes(lambda: CausalWanModel(ModelConfig.from_name("wan2.1-t2v-1.3b")))
    assert {"model." + k: list(v) for k, v in dit.items()} == {k: list(v) for k, v in keys["base_pt_generator"].items()}
    lora = lora_shapes(dit, LORA_RANK)
    assert {k: list(v) for k, v in lora.items()} == {k: list(v) for k, v in keys["lora_pt"].items()}


def test_tiny_scale_files_load_and_generate(tmp_path):
    sizes = make_weight_files(tmp_path, scale="tiny")
    assert set(sizes) == {"MemFlow/base.pt", "MemFlow/lora.pt", "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
                          "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
                          "Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer.json"}
    base = torch.load(tmp_path / "MemFlow/base.pt", weights_only=True, mmap=True)["generator"]
    assert {v.dtype for v in base.values()} == {torch.bfloat16}
    pipe = mf.load(local_dir=tmp_path, device="cpu", progress=False)
    assert pipe.model.cfg == ModelConfig.from_name("tiny")
    ids, mask = pipe.text.tokenizer(["a red kite over the sea"])
    assert int(mask.sum()) == 7  # six words and </s>
    tl = mf.Timeline.from_scope_json("data/timeline_lighthouse.scope.json")
    chunk = next(iter(mf.generate(pipe, tl, height=32, width=48, num_chunks=1, progress=False)))
    assert chunk.frames.shape == (9, 32, 48, 3)
