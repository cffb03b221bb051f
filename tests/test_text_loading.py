"""Text-encoder placement and files: streamed == resident, streamed memory stays at about one
block, the fp8 (e4m3) file of ComfyUI / Scope users loads and matches, bad files are refused by
name before anything is allocated."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_T5, WAN, write_hub_layout
from memflow_nb.pipeline import tiny_tokenizer
from memflow_nb.weights import KeyMismatch
from memflow_nb.live_bytes import LiveTensorBytes
from memflow_nb.testing import recipe_weights
from memflow_nb.text_encoder import T5Config, UMT5Encoder
from memflow_nb.weights.text import (BlockwiseEncoder, TextEncoderPlacement, choose_mode, encode_peak_bytes,
                                     load_text_encoder, text_encoder_dtype, text_encoder_placement)
from memflow_nb.weights.text_file import read_text_encoder_file

# umT5-XXL's layout (24 blocks, ffn = 2.5 x dim, 32 buckets) at a width that writes in milliseconds.
SMALL = T5Config(vocab=512, dim=128, dim_attn=128, dim_ffn=320, num_heads=4, num_layers=24, num_buckets=32)
PROMPTS = ["a fox in the snow", "an owl", "a heron standing in a river at dawn, mist over the water"]
LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate.0", "ffn.fc1", "ffn.fc2")


def _shapes(cfg=SMALL):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in UMT5Encoder(cfg).state_dict().items()}


def _is_linear(name: str) -> bool:
    return name.startswith("blocks.") and any(f".{p}.weight" in name for p in LINEARS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("umt5")
    tiny_tokenizer().save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def weights():
    return recipe_weights(_shapes(), 7)  # float32


@pytest.fixture(scope="module")
def bf16_pth(folder, weights) -> Path:
    """Wan's `.pth` layout: every tensor bf16, Wan names, zip format (memory-mappable)."""
    path = folder / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in weights.items()}, path)
    return path


def _fp8_tensors(weights, scaled: bool) -> dict:
    """Kijai's fp8 layout: block linears float8_e4m3fn (optionally / per-tensor scale), the rest bf16."""
    out = {}
    for k, v in weights.items():
        if not _is_linear(k):
            out[k] = v.to(torch.bfloat16)
        elif scaled:
            s = v.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            out[k] = (v / s).to(torch.float8_e4m3fn)
            out[k[:-len(".weight")] + ".scale_weight"] = s.reshape(()).float()
        else:
            out[k] = v.to(torch.float8_e4m3fn)
    return out


def _dequantised(tensors) -> dict:
    """The float32 weights an fp8 file stands for: fp8 * scale, bf16 widened."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".scale_weight"):
            continue
        scale = tensors.get(k[:-len(".weight")] + ".scale_weight")
        out[k] = v.float() * scale if scale is not None else v.float()
    return out


def _reference(sd: dict) -> UMT5Encoder:
    return UMT5Encoder.from_state_dict({k: v.float() for k, v in sd.items()}, SMALL)


def _encode_reference(encoder, folder, prompts=PROMPTS):
    from memflow_nb.text_encoder import PromptEncoder, Tokenizer
    return PromptEncoder(encoder, Tokenizer(folder), device="cpu", trim=True).encode_all(prompts)


# ------------------------------------------------------------------ streamed vs resident


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_equals_resident_exactly(folder, bf16_pth, dtype):
    streamed = load_text_encoder(bf16_pth, folder, "streamed", device="cpu", dtype=dtype)
    resident = load_text_encoder(bf16_pth, folder, "cpu", dtype=dtype)
    assert isinstance(streamed.encoder, BlockwiseEncoder) and streamed.encoder.streamed
    assert isinstance(resident.encoder, UMT5Encoder)
    a, b = streamed.encode_all(PROMPTS), resident.encode_all(PROMPTS)
    assert a.shape == (3, 512, SMALL.dim) and a.dtype == dtype
    assert torch.equal(a, b)
    if dtype == torch.float32:  # the untrimmed batched path (all 512 positions) agrees too
        ids, mask = resident.tokenizer(PROMPTS[:2])
        with torch.no_grad():
            assert torch.equal(streamed.encoder(ids, mask), resident.encoder(ids, mask))


def test_encode_all_reads_each_block_once(folder, bf16_pth):
    text = load_text_encoder(bf16_pth, folder, "streamed", device="cpu", dtype=torch.float32)
    made = []
    build = text.encoder._block
    text.encoder._block = lambda i: made.append(i) or build(i)
    text.encode_all(PROMPTS + PROMPTS[:1])
    assert made == list(range(SMALL.num_layers))  # one pass for all three prompts
    text(PROMPTS[1])  # cached: no pass at all
    assert len(made) == SMALL.num_layers and len(text) == 3


def test_streamed_peak_host_memory_is_one_block(folder, bf16_pth):
    """Bytes of tensors alive at once, counted where they are made (RSS is allocator-dependent)."""
    file_bytes = bf16_pth.stat().st_size
    info, _ = read_text_encoder_file(bf16_pth)
    block = info.block_bytes(torch.float32)
    with LiveTensorBytes() as live:
        text = load_text_encoder(bf16_pth, folder, "streamed", device="cpu", dtype=torch.float32)
        emb = text.encode_all(PROMPTS)
    peak = live.peak["cpu"]
    out = emb.numel() * emb.element_size()  # the embeddings themselves, [3, 512, dim] float32
    with LiveTensorBytes() as resident_live:
        load_text_encoder(bf16_pth, folder, "cpu", dtype=torch.float32).encode_all(PROMPTS)
    print(f"file {file_bytes / 1e6:.2f} MB, one block in fp32 {block / 1e6:.3f} MB, embeddings {out / 1e6:.3f} MB: "
          f"streamed peak {peak / 1e6:.3f} MB, resident peak {resident_live.peak['cpu'] / 1e6:.2f} MB")
    # One block plus the embeddings, and a small margin for activations of these short prompts.
    assert peak <= 1.1 * block + out + 0.1 * block
    assert peak < file_bytes / 5
    assert resident_live.peak["cpu"] > 2 * file_bytes * 0.95  # the contrast: a float32 copy of everything


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_encode_peak_estimate_matches_measurement(folder, bf16_pth, dtype):
    info, _ = read_text_encoder_file(bf16_pth)
    # A bf16 file computed in bf16 on the CPU is used in place (mapped); fp32 widens one block.
    weights = info.block_bytes(dtype) if dtype != torch.bfloat16 else 0
    text = load_text_encoder(bf16_pth, folder, "streamed", device="cpu", dtype=dtype)
    for lengths in ([12], [250], [12, 120, 250]):
        prompts = ["x" * (n - 1) for n in lengths]  # one token per byte, plus </s>
        text.clear()
        with LiveTensorBytes() as live:
            text.encode_all(prompts)
        want = encode_peak_bytes(SMALL, dtype, lengths, weights=weights)
        got = live.peak["cpu"]
        print(f"{dtype} {lengths}: estimated {want / 1e6:.3f} MB, measured {got / 1e6:.3f} MB")
        assert abs(want - got) <= 0.15 * got, (lengths, want, got)


# ------------------------------------------------------------------ the fp8 file


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_fp8_file_loads_and_matches(folder, weights, scaled):
    tensors = _fp8_tensors(weights, scaled)
    path = folder / f"umt5-xxl-enc-fp8_e4m3fn{'_scaled' if scaled else ''}.safetensors"
    save_file(tensors, str(path))
    info, _ = read_text_encoder_file(path)
    assert info.scaled == scaled and len(info.fp8) == 7 * SMALL.num_layers
    assert info.resident_bytes(torch.bfloat16) < path.stat().st_size * 1.01  # fp8 stays 1 byte when resident

    # Same numbers as a float32 model holding the weights the file stands for, streamed or resident.
    exact = _encode_reference(_reference(_dequantised(tensors)), folder)
    for mode in ("streamed", "cpu"):
        text = load_text_encoder(path, folder, mode, device="cpu", dtype=torch.float32)
        assert torch.equal(text.encode_all(PROMPTS), exact), mode
    # Those weights are the float32 ones up to e4m3 rounding: 3 mantissa bits (relative error
    # <= 2^-4), subnormals below 2^-6 (absolute error <= 2^-10) -- times the scale, if any.
    worst = 0.0
    for name, w in weights.items():
        got = text.encoder.weight(name)
        if not _is_linear(name):
            assert torch.equal(got, w.to(torch.bfloat16).float()), name
            continue
        s = tensors[name[:-len(".weight")] + ".scale_weight"] if scaled else torch.tensor(1.0)
        err = (got - w).abs()
        assert bool((err <= 2 ** -4 * w.abs() + 2 ** -10 * s + 1e-7).all()), name
        worst = max(worst, (err.norm() / w.norm()).item())
    print(f"fp8 ({'scaled' if scaled else 'plain'}): worst relative L2 error of a linear weight {worst:.4f}")
    assert 0 < worst < (0.03 if scaled else 0.06)


def test_fp8_resident_keeps_linears_in_fp8(folder, weights):
    path = folder / "resident_fp8.safetensors"
    save_file(_fp8_tensors(weights, False), str(path))
    text = load_text_encoder(path, folder, "cpu", dtype=torch.float32)
    enc = text.encoder
    assert isinstance(enc, BlockwiseEncoder) and not enc.streamed
    assert enc.tensors["blocks.0.attn.q.weight"].dtype == torch.float8_e4m3fn
    assert enc.tensors["token_embedding.weight"].dtype == torch.float32
    assert enc.weight("blocks.0.attn.q.weight").dtype == torch.float32


def _refused(path, *needles):
    with LiveTensorBytes() as live, pytest.raises(KeyMismatch) as err:
        read_text_encoder_file(path)
    assert live.peak.get("cpu", 0) == 0  # refused from the header: nothing was allocated
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return err.value


def test_fp8_file_refusals_name_the_key(folder, weights, tmp_path):
    good = _fp8_tensors(weights, scaled=True)

    no_scale = dict(good)
    del no_scale["blocks.3.attn.q.scale_weight"]
    save_file(no_scale, str(tmp_path / "a.safetensors"))
    e = _refused(tmp_path / "a.safetensors", "missing scales", "blocks.3.attn.q.scale_weight")
    assert e.mismatched == ["blocks.3.attn.q.scale_weight"]

    wrong = _fp8_tensors(weights, scaled=False)
    wrong["token_embedding.weight"] = wrong["token_embedding.weight"].to(torch.float8_e4m3fn)
    wrong["blocks.2.ffn.fc1.weight"] = weights["blocks.2.ffn.fc1.weight"].to(torch.float8_e5m2)
    wrong["blocks.4.norm1.weight"] = torch.ones(SMALL.dim, dtype=torch.int8)
    save_file(wrong, str(tmp_path / "b.safetensors"))
    _refused(tmp_path / "b.safetensors", "token_embedding.weight: float8_e4m3fn", "blocks.2.ffn.fc1.weight",
             "float8_e5m2", "blocks.4.norm1.weight")

    keys = _fp8_tensors(weights, scaled=False)
    del keys["blocks.5.ffn.fc2.weight"]
    keys["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    keys["blocks.1.norm1.scale_weight"] = torch.ones(())
    save_file(keys, str(tmp_path / "c.safetensors"))
    e = _refused(tmp_path / "c.safetensors", "missing keys", "blocks.5.ffn.fc2.weight", "unexpected keys",
                 "scaled_fp8", "blocks.1.norm1.scale_weight")
    assert e.missing == ["blocks.5.ffn.fc2.weight"]

    bad_scale = dict(good)
    bad_scale["blocks.0.attn.k.scale_weight"] = torch.ones(3)
    save_file(bad_scale, str(tmp_path / "d.safetensors"))
    _refused(tmp_path / "d.safetensors", "blocks.0.attn.k.scale_weight: a scale must be one float")


def test_hugging_face_names_are_refused_with_the_reason(tmp_path):
    save_file({"shared.weight": torch.zeros(8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
               "encoder.block.0.layer.0.SelfAttention.q.scale_weight": torch.ones(())}, str(tmp_path / "hf.safetensors"))
    _refused(tmp_path / "hf.safetensors", "Hugging Face T5 names", "umt5-xxl-enc-fp8_e4m3fn.safetensors")


def test_pth_with_a_wrong_shape_is_refused(folder, weights, tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    sd["blocks.7.attn.o.weight"] = torch.zeros(SMALL.dim, SMALL.dim + 1, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(KeyMismatch, match=r"blocks\.7\.attn\.o\.weight: \[128, 129\]"):
        load_text_encoder(tmp_path / "bad.pth", folder, "streamed", device="cpu")


# ------------------------------------------------------------------ placement


def test_text_encoder_dtype_by_capability():
    assert text_encoder_dtype("cuda", (9, 0)) == torch.bfloat16
    assert text_encoder_dtype("cuda", (8, 0)) == torch.bfloat16
    assert text_encoder_dtype("cuda", (7, 5)) == torch.float32  # a T4: no bf16, and umT5 overflows fp16
    assert text_encoder_dtype("cpu") == torch.float32


def test_choose_mode_and_auto_placement():
    gib = 2 ** 30
    assert choose_mode("cuda", resident_bytes=11 * gib, free_bytes=80 * gib, reserve_bytes=20 * gib) == "gpu"
    assert choose_mode("cuda", resident_bytes=11 * gib, free_bytes=12 * gib, reserve_bytes=8 * gib) == "streamed"
    assert choose_mode("cpu", resident_bytes=23 * gib, free_bytes=12 * gib) == "streamed"
    assert choose_mode("cpu", resident_bytes=1 * gib, free_bytes=12 * gib) == "cpu"
    assert choose_mode("cuda", resident_bytes=1, free_bytes=None) == "streamed"
    p = text_encoder_placement("auto", "cuda", capability=(7, 5), resident_bytes=23 * gib, free_bytes=14 * gib)
    assert p == TextEncoderPlacement("streamed", torch.device("cuda"), torch.float32)
    p = text_encoder_placement("auto", "cpu", "bf16", resident_bytes=gib, free_bytes=4 * gib)
    assert (p.mode, p.dtype) == ("cpu", torch.bfloat16)
    assert text_encoder_placement("cpu").device == torch.device("cpu")
    assert text_encoder_placement(p) is p


def test_placement_validation():
    with pytest.raises(ValueError, match="mode='resident'"):
        TextEncoderPlacement("resident", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="'cpu' computes on the CPU"):
        TextEncoderPlacement("cpu", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="'gpu' needs a GPU"):
        TextEncoderPlacement("gpu", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        TextEncoderPlacement("streamed", torch.device("cpu"), torch.float8_e4m3fn)


# ------------------------------------------------------------------ load(text_encoder=...)


def test_load_takes_the_fp8_file_and_never_fetches_the_pth(tmp_path, monkeypatch):
    from memflow_nb.pipeline import load

    root = tmp_path / "hub"
    write_hub_layout(root)
    (root / WAN / "models_t5_umt5-xxl-enc-bf16.pth").unlink()  # this user only has the fp8 file
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UMT5Encoder(TINY_T5).state_dict().items()}
    tensors = _fp8_tensors(recipe_weights(shapes, 9), scaled=False)
    fp8 = tmp_path / "umt5-xxl-enc-fp8_e4m3fn.safetensors"
    save_file(tensors, str(fp8))

    def refuse(*a, **k):
        raise AssertionError("nothing may be downloaded")
    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    pipe = load(local_dir=root, device="cpu", text_encoder=fp8, text_encoder_mode="streamed", progress=False)
    assert isinstance(pipe.text.encoder, BlockwiseEncoder) and pipe.text.encoder.streamed
    emb = pipe.text.encode_all(["a cat", "a dog on a skateboard"])
    assert emb.shape == (2, 512, TINY_T5.dim) and emb.dtype == torch.float32
    from memflow_nb.text_encoder import PromptEncoder
    ref = UMT5Encoder.from_state_dict(_dequantised(tensors), TINY_T5)
    want = PromptEncoder(ref, pipe.text.tokenizer, device="cpu", trim=True).encode_all(["a cat", "a dog on a skateboard"])
    assert torch.equal(emb, want)
    with pytest.raises(ValueError, match="needs a GPU"):
        load(local_dir=root, device="cpu", text_encoder=fp8, text_encoder_mode="gpu", progress=False)
