"""User LoRAs: every key layout merges to W + scale * (alpha / rank) * B @ A, scales change and LoRAs
come out bit-exactly, and each kind of bad file is refused with a message that names the problem.

The files are written here in each community layout, for the tiny model; the diffusers names are
spelled out below on purpose (not taken from memflow_nb), so a wrong mapping there fails here.
"""
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from memflow_nb import pipeline as hub
from memflow_nb.engine.config import ModelConfig
from memflow_nb.weights import KeyMismatch, UnsafeCheckpoint
from memflow_nb.lora_stack import add_lora, add_loras, lora_scales, remove_lora, set_lora_scale
from memflow_nb.engine.model import CausalWanModel
from memflow_nb.testing import recipe_weights
from memflow_nb.user_lora import LoraForAnotherModel, loras_from_scope_settings, read_user_lora

TINY = ModelConfig.from_name("tiny")
RANK = 4
BLOCK_TARGETS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2"}


def tiny_model(dtype=torch.float32, seed=3) -> CausalWanModel:
    with torch.device("meta"):
        model = CausalWanModel(TINY)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = {k: v.to(dtype) for k, v in recipe_weights(shapes, seed).items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def factors(rank=RANK, seed=5, alpha=2.0, blocks=range(TINY.num_layers), targets=BLOCK_TARGETS) -> dict:
    """{Wan module: (down [r, in], up [out, r], alpha)} for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in blocks:
        for t in targets:
            d_in = TINY.ffn_dim if t == "ffn.2" else TINY.dim
            d_out = TINY.ffn_dim if t == "ffn.0" else TINY.dim
            out[f"blocks.{i}.{t}"] = (torch.randn(rank, d_in, generator=g) * 0.2,
                                      torch.randn(d_out, rank, generator=g) * 0.2, alpha)
    return out


def _diffusers(module):
    i, inner = module.split(".", 2)[1:]
    return f"blocks.{i}.{DIFFUSERS[inner]}"


def write(path, f, layout, metadata=None):
    """Write factors `f` in one community layout; returns the coefficient each layer should get."""
    sd, coef = {}, {}
    for m, (down, up, alpha) in f.items():
        r = down.shape[0]
        if layout == "kohya":  # musubi-tuner: flattened names, lora_down / lora_up, a 0-d alpha
            k = "lora_unet_" + m.replace(".", "_")
            sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
            coef[m] = alpha / r
        elif layout == "kohya_int_alpha":  # musubi's converter writes alpha = rank as an integer tensor
            k = "lora_unet_" + m.replace(".", "_")
            sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(r)}
            coef[m] = 1.0
        elif layout == "wan_fun":  # two underscores after lora_unet
            k = "lora_unet__" + m.replace(".", "_")
            sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
            coef[m] = alpha / r
        elif layout == "comfy":  # diffusion_model. + Wan names, with an alpha
            k = "diffusion_model." + m
            sd |= {f"{k}.lora_A.weight": down, f"{k}.lora_B.weight": up, f"{k}.alpha": torch.tensor(alpha)}
            coef[m] = alpha / r
        elif layout == "comfy_no_alpha":  # musubi's "other" export: alpha folded in, scale 1
            k = "diffusion_model." + m
            sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up}
            coef[m] = 1.0
        elif layout == "diffusers":  # transformer. + diffusers names, no alpha: alpha = rank
            k = "transformer." + _diffusers(m)
            sd |= {f"{k}.lora_A.weight": down, f"{k}.lora_B.weight": up}
            coef[m] = 1.0
        elif layout == "lycoris":  # SimpleTuner / ai-toolkit: flattened diffusers names
            k = "lycoris_" + _diffusers(m).replace(".", "_")
            sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
            coef[m] = alpha / r
        elif layout == "peft":  # PEFT-wrapped Wan names with the adapter name, as peft saves them
            k = "base_model.model." + m
            sd |= {f"{k}.lora_A.default.weight": down, f"{k}.lora_B.default.weight": up}
            coef[m] = 1.0
        else:
            raise AssertionError(layout)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return coef


LAYOUTS = ["kohya", "kohya_int_alpha", "wan_fun", "lycoris", "comfy", "comfy_no_alpha", "diffusers", "peft"]


def expected_weights(base, f, coef, scale):
    out = {}
    for m, (down, up, _) in f.items():
        out[m + ".weight"] = base[m + ".weight"].double() + scale * coef[m] * (up.double() @ down.double())
    return out


# ------------------------------------------------------------------------------- merging

@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_merges_w_plus_scaled_ba(tmp_path, layout):
    model, f = tiny_model(), factors()
    base = weights(model)
    coef = write(tmp_path / f"{layout}.safetensors", f, layout)
    assert add_lora(model, tmp_path / f"{layout}.safetensors", 0.7) == layout
    after = weights(model)
    want = expected_weights(base, f, coef, 0.7)
    assert len(want) == TINY.num_layers * len(BLOCK_TARGETS)
    for k, w in want.items():
        torch.testing.assert_close(after[k].double(), w, rtol=1e-6, atol=1e-6)
        assert not torch.equal(after[k], base[k])
    for k in set(base) - set(want):  # biases, norms, embeddings, head: untouched, bit for bit
        assert torch.equal(after[k], base[k]), k
    assert lora_scales(model) == {layout: 0.7}


def test_diffusers_metadata_alpha_and_rslora(tmp_path):
    f = factors()
    for rslora, coef in ((False, 8 / RANK), (True, 8 / math.sqrt(RANK))):
        model = tiny_model()
        base = weights(model)
        meta = {"transformer.r": RANK, "transformer.lora_alpha": 8, "transformer.use_rslora": rslora}
        write(tmp_path / "d.safetensors", f, "diffusers", {"lora_adapter_metadata": json.dumps(meta)})
        add_lora(model, tmp_path / "d.safetensors", 1.0)
        want = expected_weights(base, f, {m: coef for m in f}, 1.0)
        for k, w in want.items():
            torch.testing.assert_close(model.state_dict()[k].double(), w, rtol=1e-6, atol=1e-6)


def test_peft_adapter_config_alpha_and_pattern(tmp_path):
    f = factors()
    folder = tmp_path / "my_adapter"
    folder.mkdir()
    write(folder / "adapter_model.safetensors", f, "peft")
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 8,
                                                            "alpha_pattern": {"ffn.2": 2}}))
    model = tiny_model()
    base = weights(model)
    add_lora(model, folder / "adapter_model.safetensors", 1.0)
    coef = {m: (2 if m.endswith("ffn.2") else 8) / RANK for m in f}
    for k, w in expected_weights(base, f, coef, 1.0).items():
        torch.testing.assert_close(model.state_dict()[k].double(), w, rtol=1e-6, atol=1e-6)


def test_diff_and_bias_patches(tmp_path):
    model = tiny_model()
    base = weights(model)
    g = torch.Generator().manual_seed(1)
    diff_b = torch.randn(TINY.ffn_dim, generator=g)
    diff = torch.randn(TINY.dim, generator=g)
    save_file({"diffusion_model.blocks.1.ffn.0.diff_b": diff_b, "diffusion_model.blocks.0.norm3.diff": diff},
              str(tmp_path / "d.safetensors"))
    add_lora(model, tmp_path / "d.safetensors", 0.5)
    sd = model.state_dict()
    torch.testing.assert_close(sd["blocks.1.ffn.0.bias"], base["blocks.1.ffn.0.bias"] + 0.5 * diff_b)
    torch.testing.assert_close(sd["blocks.0.norm3.weight"], base["blocks.0.norm3.weight"] + 0.5 * diff)
    remove_lora(model, "d")
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------- exact scale / removal

def test_scale_change_and_removal_are_exact_in_bf16(tmp_path):
    f = factors()
    write(tmp_path / "style.safetensors", f, "kohya")
    model = tiny_model(torch.bfloat16)
    base = weights(model)
    add_lora(model, tmp_path / "style.safetensors", 0.8)
    # Subtracting what was added does not give bf16 weights back: the exact path is needed.
    k = "blocks.0.self_attn.q.weight"
    down, up, alpha = f["blocks.0.self_attn.q"]
    naive = (model.state_dict()[k].float() - 0.8 * alpha / RANK * (up @ down)).to(torch.bfloat16)
    assert not torch.equal(naive, base[k])

    set_lora_scale(model, "style", 0.3)
    fresh = tiny_model(torch.bfloat16)
    add_lora(fresh, tmp_path / "style.safetensors", 0.3)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())

    set_lora_scale(model, "style", 0.0)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    set_lora_scale(model, "style", 1.5)
    remove_lora(model, "style")
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert lora_scales(model) == {} and model.user_loras.originals == {}


def test_stacked_loras_remove_one_gives_the_other_alone(tmp_path):
    write(tmp_path / "a.safetensors", factors(seed=1), "comfy")
    write(tmp_path / "b.safetensors", factors(seed=2, targets=["self_attn.q", "ffn.2"]), "diffusers")
    model = tiny_model(torch.bfloat16)
    assert add_loras(model, [(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", 0.5)]) == ["a", "b"]
    set_lora_scale(model, "b", 2.0)
    remove_lora(model, "a")
    only_b = tiny_model(torch.bfloat16)
    add_lora(only_b, tmp_path / "b.safetensors", 2.0)
    assert all(torch.equal(v, only_b.state_dict()[k]) for k, v in model.state_dict().items())
    assert set(model.user_loras.originals) == {p.target for p in read_user_lora(tmp_path / "b.safetensors",
                                                                                 model).patches}
    # The same file twice gets a second name.
    assert add_lora(model, tmp_path / "b.safetensors", 1.0) == "b-2"
    assert lora_scales(model) == {"b": 2.0, "b-2": 1.0}


def test_load_merges_user_loras(tmp_path):
    write(tmp_path / "style.safetensors", factors(), "kohya")
    plain = hub.load("tiny", device="cpu", dtype=torch.float32, progress=False)
    pipe = hub.load("tiny", device="cpu", dtype=torch.float32, progress=False,
                    loras=[(tmp_path / "style.safetensors", 0.5)])
    assert lora_scales(pipe.model) == {"style": 0.5}
    k = "blocks.1.ffn.2.weight"
    assert not torch.equal(pipe.model.state_dict()[k], plain.model.state_dict()[k])
    remove_lora(pipe.model, "style")
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in pipe.model.state_dict().items())


# ---------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_pickles_refused_with_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"style{suffix}"
    torch.save({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(1, TINY.dim)}, path)
    with pytest.raises(UnsafeCheckpoint, match="convert") as e:
        add_lora(tiny_model(), path)
    assert "safetensors" in str(e.value) and str(path) in str(e.value)


def test_every_unmatched_key_listed_and_nothing_changes(tmp_path):
    f = factors()
    write(tmp_path / "good.safetensors", f, "kohya")
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "good.safetensors"))
    stray = [f"lora_unet_blocks_0_self_attn_z{i}.lora_down.weight" for i in range(25)]
    sd |= {k: torch.zeros(RANK, TINY.dim) for k in stray}
    save_file(sd, str(tmp_path / "bad.safetensors"))
    model = tiny_model()
    base = weights(model)
    with pytest.raises(KeyMismatch) as e:
        add_loras(model, [(tmp_path / "good.safetensors", 1.0), (tmp_path / "bad.safetensors", 1.0)])
    assert all(k in str(e.value) for k in stray) and "25 keys match no layer" in str(e.value)
    assert sorted(e.value.unexpected) == sorted(stray)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items()) and lora_scales(model) == {}


def _save(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_rank_and_shape_mismatches_name_the_layer(tmp_path):
    model = tiny_model()
    k = "diffusion_model.blocks.1.self_attn.k"
    rank = _save(tmp_path / "rank.safetensors", {f"{k}.lora_A.weight": torch.zeros(3, TINY.dim),
                                                 f"{k}.lora_B.weight": torch.zeros(TINY.dim, 4)})
    with pytest.raises(KeyMismatch, match=r"blocks\.1\.self_attn\.k: .*do not share a rank"):
        add_lora(model, rank)
    shape = _save(tmp_path / "shape.safetensors", {f"{k}.lora_A.weight": torch.zeros(4, TINY.dim + 1),
                                                   f"{k}.lora_B.weight": torch.zeros(TINY.dim, 4)})
    with pytest.raises(KeyMismatch, match=r"blocks\.1\.self_attn\.k: the LoRA makes a \[64, 65\] change"):
        add_lora(model, shape)
    half = _save(tmp_path / "half.safetensors", {f"{k}.lora_A.weight": torch.zeros(4, TINY.dim)})
    with pytest.raises(KeyMismatch, match=r"blocks\.1\.self_attn\.k: has lora_down/A but no lora_up/B"):
        add_lora(model, half)
    lokr = _save(tmp_path / "lokr.safetensors", {f"{k}.lokr_w1": torch.zeros(4, 4)})
    with pytest.raises(KeyMismatch, match="LoKr"):
        add_lora(model, lokr)
    alpha = _save(tmp_path / "alpha.safetensors", {f"{k}.alpha": torch.tensor(1.0)})
    with pytest.raises(KeyMismatch, match=r"blocks\.1\.self_attn\.k: has an alpha but no lora_A/lora_B pair"):
        add_lora(model, alpha)


def test_14b_lora_refused_as_such(tmp_path):
    # A 14B LoRA (width 5120, 40 blocks), rank 1 to keep the file small, in the diffusers layout.
    sd = {}
    for i in (0, 39):
        k = f"transformer.blocks.{i}.attn1.to_q"
        sd |= {f"{k}.lora_A.weight": torch.zeros(1, 5120), f"{k}.lora_B.weight": torch.zeros(5120, 1)}
    with pytest.raises(LoraForAnotherModel, match=r"14B.*width 5120, with blocks up to 39"):
        add_lora(tiny_model(), _save(tmp_path / "big.safetensors", sd))
    # Deeper than the model alone is enough, whatever the layout.
    deep = {"lora_unet_blocks_7_ffn_0.lora_down.weight": torch.zeros(1, TINY.dim),
            "lora_unet_blocks_7_ffn_0.lora_up.weight": torch.zeros(TINY.ffn_dim, 1)}
    with pytest.raises(LoraForAnotherModel, match="blocks up to 7"):
        add_lora(tiny_model(), _save(tmp_path / "deep.safetensors", deep))


def test_image_to_video_lora_refused_as_such(tmp_path):
    sd = {}
    for t in ("q", "k_img"):
        k = f"diffusion_model.blocks.0.cross_attn.{t}"
        sd |= {f"{k}.lora_A.weight": torch.zeros(2, TINY.dim), f"{k}.lora_B.weight": torch.zeros(TINY.dim, 2)}
    with pytest.raises(LoraForAnotherModel, match="image-conditioned.*cross_attn.k_img"):
        add_lora(tiny_model(), _save(tmp_path / "i2v.safetensors", sd))


def test_bad_scales_and_names(tmp_path):
    write(tmp_path / "a.safetensors", factors(), "kohya")
    model = tiny_model()
    with pytest.raises(ValueError, match="finite"):
        add_lora(model, tmp_path / "a.safetensors", float("nan"))
    add_lora(model, tmp_path / "a.safetensors")
    with pytest.raises(KeyError, match=r"'b'.*\['a'\]"):
        set_lora_scale(model, "b", 1.0)
    with pytest.raises(ValueError, match="finite"):
        set_lora_scale(model, "a", "x")


# -------------------------------------------------------------------------------------- Scope

def test_loras_from_scope_settings(tmp_path):
    # The shape Scope's timeline exporter writes (version 2.1): LoRAConfig objects and a strategy.
    settings = {"pipelineId": "memflow", "loraMergeStrategy": "permanent_merge",
                "loras": [{"id": "0b5c", "path": "/home/u/.daydream-scope/models/lora/ink.safetensors",
                           "scale": 0.7, "mergeMode": "runtime_peft"},
                          {"id": "9f1e", "path": "sub/style.safetensors", "scale": -1}]}
    assert loras_from_scope_settings(settings) == [("/home/u/.daydream-scope/models/lora/ink.safetensors", 0.7),
                                                   ("sub/style.safetensors", -1.0)]
    assert loras_from_scope_settings(settings, lora_dir="/data/loras")[1] == ("/data/loras/sub/style.safetensors",
                                                                              -1.0)
    here = tmp_path / "loras"
    here.mkdir()
    (here / "ink.safetensors").write_bytes(b"")  # an absolute path from another machine: found by name
    assert loras_from_scope_settings(settings, lora_dir=here)[0] == (str(here / "ink.safetensors"), 0.7)
    windows = {"loras": [{"path": "C:\\Users\\u\\.daydream-scope\\models\\lora\\ink.safetensors", "scale": 1}]}
    assert loras_from_scope_settings(windows, lora_dir=here) == [(str(here / "ink.safetensors"), 1.0)]
    assert loras_from_scope_settings({"loras": [], "loraMergeStrategy": "permanent_merge"}) == []
    assert loras_from_scope_settings({"pipelineId": "longlive"}) == []
    with pytest.warns(UserWarning, match=r"settings\.loras\[0\] has no path"):
        assert loras_from_scope_settings({"loras": [{"id": "x", "path": "", "scale": 1.0}]}) == []
    with pytest.warns(UserWarning, match="unknown LoRA merge strategy"):
        loras_from_scope_settings({"loras": [], "loraMergeStrategy": "sometimes"})
    with pytest.raises(ValueError, match=r"settings\.loras must be a list"):
        loras_from_scope_settings({"loras": {"path": "a"}})
    with pytest.raises(ValueError, match=r"settings\.loras\[0\]\.scale"):
        loras_from_scope_settings({"loras": [{"path": "a.safetensors", "scale": "big"}]})
    with pytest.raises(ValueError, match=r"settings\.loras\[0\]\.path"):
        loras_from_scope_settings({"loras": [{"scale": 1.0}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loras_from_scope_settings(settings)
