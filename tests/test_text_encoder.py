"""umT5 encoder, tokenizer and prompt cache: golden parity with the official code, checkpoint
names, HF-equivalent tokenization, exact zeroing of padded rows."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from memflow_nb.testing import recipe_weights
from memflow_nb.text_encoder import (PromptEncoder, T5Config, Tokenizer, UMT5Encoder, _clamp_fp16, clean_text,
                                     encode_prompts, relative_position_buckets)

DATA = Path(__file__).parent / "data"
GOLDEN_TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(DATA / "t5.safetensors")
    with safe_open(DATA / "t5.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return tensors, meta


@pytest.fixture(scope="module")
def recipe_shapes():
    return json.loads((DATA / "recipe_keys.json").read_text())["t5"]


@pytest.fixture(scope="module")
def tiny_encoder(golden, recipe_shapes):
    """The golden config with the golden weights, loaded the way a real checkpoint is."""
    _, meta = golden
    with torch.device("meta"):
        enc = UMT5Encoder(T5Config.from_dict(meta["config"]))
    enc.load_state_dict(recipe_weights(recipe_shapes, meta["weight_seed"]), strict=True, assign=True)
    return enc.requires_grad_(False)


# ------------------------------------------------------------------ model


def test_golden_parity(golden, tiny_encoder):
    tensors, _ = golden
    with torch.no_grad():
        hidden = tiny_encoder(tensors["ids"], tensors["mask"])
    assert hidden.shape == tensors["hidden"].shape
    err = (hidden - tensors["hidden"]).abs().max().item()
    print(f"t5 golden max|diff| = {err:.3e}")
    assert err <= GOLDEN_TOL


def test_golden_padding_invariance(golden, tiny_encoder):
    """Real positions must not depend on how much padding follows (relative positions, masked keys)."""
    tensors, _ = golden
    ids, mask = tensors["ids"][:1], tensors["mask"][:1]
    n = int(mask.sum())
    with torch.no_grad():
        full = tiny_encoder(ids, mask)[:, :n]
        short = tiny_encoder(ids[:, :n], mask[:, :n])
        unmasked = tiny_encoder(ids, torch.ones_like(mask))[:, :n]
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    # and the mask is doing something: attending to the pads changes the result
    assert (unmasked - full).abs().max() > 1e-2


def test_from_state_dict_matches_golden(golden, recipe_shapes):
    tensors, meta = golden
    enc = UMT5Encoder.from_state_dict(recipe_weights(recipe_shapes, meta["weight_seed"]),
                                      T5Config.from_dict(meta["config"]))
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        err = (enc(tensors["ids"], tensors["mask"]) - tensors["hidden"]).abs().max().item()
    assert err <= GOLDEN_TOL


def test_bf16_weights_run_close_to_fp32(golden, recipe_shapes):
    tensors, meta = golden
    enc = UMT5Encoder.from_state_dict(recipe_weights(recipe_shapes, meta["weight_seed"]),
                                      T5Config.from_dict(meta["config"]), dtype=torch.bfloat16)
    with torch.no_grad():
        hidden = enc(tensors["ids"], tensors["mask"])
    assert hidden.dtype == torch.bfloat16
    ref = tensors["hidden"]
    rel = (hidden.float() - ref).norm() / ref.norm()
    # With these random weights, rounding the weights to bf16 alone moves the output by 3.4%
    # (relative L2); bf16 compute on top measures 5.6%. A wrong op would be far off.
    assert rel < 0.1, rel


def test_rmsnorm_bf16_is_fp32_math_rounded_once():
    enc = UMT5Encoder(T5Config(vocab=8, dim=256, dim_attn=16, dim_ffn=8, num_heads=2, num_layers=1,
                               num_buckets=8))
    norm = enc.norm.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(256, generator=g))
        x = (torch.randn(4, 256, generator=g) * 300 + 50).to(torch.bfloat16)
        x32 = x.float()
        want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_state_dict_matches_recipe_keys(tiny_encoder, recipe_shapes):
    got = {k: list(v.shape) for k, v in tiny_encoder.state_dict().items()}
    assert got == {k: list(v) for k, v in recipe_shapes.items()}


def test_umt5_xxl_preset_matches_checkpoint_layout():
    cfg = T5Config.from_name("umt5-xxl")
    with torch.device("meta"):
        enc = UMT5Encoder(cfg)
    sd = enc.state_dict()
    assert len(sd) == 242
    assert not list(enc.buffers())
    # Appendix C of the spec (the shapes of models_t5_umt5-xxl-enc-bf16.pth)
    want = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for i in range(24):
        want[f"blocks.{i}.norm1.weight"] = (4096,)
        want[f"blocks.{i}.norm2.weight"] = (4096,)
        for p in "qkvo":
            want[f"blocks.{i}.attn.{p}.weight"] = (4096, 4096)
        want[f"blocks.{i}.ffn.gate.0.weight"] = (10240, 4096)
        want[f"blocks.{i}.ffn.fc1.weight"] = (10240, 4096)
        want[f"blocks.{i}.ffn.fc2.weight"] = (4096, 10240)
        want[f"blocks.{i}.pos_embedding.embedding.weight"] = (32, 64)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert round(sum(v.numel() for v in sd.values()) / 1e9, 2) == 5.68


def test_shared_pos_layout():
    cfg = T5Config(vocab=10, dim=8, dim_attn=8, dim_ffn=8, num_heads=2, num_layers=2, num_buckets=8,
                   shared_pos=True)
    keys = set(UMT5Encoder(cfg).state_dict())
    assert "pos_embedding.embedding.weight" in keys
    assert not any(k.startswith("blocks.") and "pos_embedding" in k for k in keys)


def test_config_validation_and_from_dict():
    with pytest.raises(ValueError, match="divisible"):
        T5Config(vocab=10, dim=8, dim_attn=10, dim_ffn=8, num_heads=4, num_layers=1, num_buckets=8)
    with pytest.raises(ValueError, match="unknown T5 preset"):
        T5Config.from_name("t5-base")
    cfg = T5Config.from_dict({"vocab": 10, "dim": 8, "dim_attn": 8, "dim_ffn": 8, "num_heads": 2,
                              "num_layers": 1, "num_buckets": 8, "dropout": 0.1})
    assert cfg.head_dim == 4 and cfg.max_distance == 128 and not cfg.shared_pos


def test_relative_position_buckets():
    n, nb, maxd = 300, 32, 128
    b = relative_position_buckets(n, nb, maxd)
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    half, exact = nb // 2, nb // 4
    assert b.dtype == torch.int64 and b.shape == (n, n)
    assert b.min() == 0 and b.max() == nb - 1
    # keys after the query use the upper half; the rest (self included) the lower half
    assert bool(((b >= half) == (rel > 0)).all())
    # small distances are exact
    near = rel.abs() < exact
    assert torch.equal(b[near] % half, rel.abs()[near])
    # far distances saturate in the last bucket of each half
    far = rel.abs() >= maxd
    assert bool((b[far] % half == half - 1).all())
    # bucket grows with distance and depends only on (distance, direction)
    row = b[0, 1:]  # distances 1.. to the right
    assert bool((row[1:] >= row[:-1]).all())
    assert torch.equal(b[n - 1, :-1].flip(0) + half, row)  # same distance to the left: lower half
    # log spacing: distances 8..127 cover every middle bucket
    assert set((row[exact - 1:maxd - 1] % half).tolist()) == set(range(exact, half))


# ------------------------------------------------------------------ tokenizer

WORDS = ["Tom", "&", "Jerry", "<b>", "a", "cat"] + [f"w{i}" for i in range(700)]


def _write_tokenizer(folder: Path, *, eos_processor: bool = True) -> Path:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos_processor:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _id(word: str) -> int:
    return WORDS.index(word) + 3


@pytest.fixture
def tok(tmp_path) -> Tokenizer:
    return Tokenizer(_write_tokenizer(tmp_path / "umt5"))


def test_tokenizer_pads_masks_and_ends_with_eos(tok):
    ids, mask = tok(["a cat", "Tom & Jerry a cat"])
    L = 512
    assert ids.shape == mask.shape == (2, L) and ids.dtype == mask.dtype == torch.int64
    assert ids[0, :3].tolist() == [_id("a"), _id("cat"), 1]
    assert ids[1, :6].tolist() == [_id("Tom"), _id("&"), _id("Jerry"), _id("a"), _id("cat"), 1]
    assert mask.sum(1).tolist() == [3, 6]
    for row, n in ((0, 3), (1, 6)):
        assert bool((mask[row, :n] == 1).all()) and bool((mask[row, n:] == 0).all())
        assert bool((ids[row, n:] == 0).all())
    assert int((ids == 1).sum()) == 2  # exactly one </s> per prompt, not doubled


def test_tokenizer_appends_eos_when_processor_does_not(tmp_path):
    tok = Tokenizer(_write_tokenizer(tmp_path / "bare", eos_processor=False))
    ids, mask = tok("a cat")
    assert ids[0, :4].tolist() == [_id("a"), _id("cat"), 1, 0]
    assert int(mask.sum()) == 3


def test_clean_text_html_and_whitespace(tok):
    assert clean_text("  Tom &amp;amp; Jerry\n\t  a\u3000cat  ") == "Tom & Jerry a cat"
    assert clean_text("&amp;lt;b&amp;gt;") == "<b>"
    ids, _ = tok("\n Tom &amp;amp;   Jerry &lt;b&gt; ")
    assert ids[0, :5].tolist() == [_id("Tom"), _id("&"), _id("Jerry"), _id("<b>"), 1]
    assert 2 not in ids[0].tolist()  # no <unk>: the cleaning produced known words


def test_tokenizer_truncation_keeps_eos_and_warns(tok):
    words = [f"w{i}" for i in range(600)]
    with pytest.warns(UserWarning, match=r"last 89 tokens were dropped"):
        ids, mask = tok(" ".join(words))
    assert ids[0, :511].tolist() == [_id(w) for w in words[:511]]
    assert int(ids[0, 511]) == 1
    assert bool((mask == 1).all())


def test_tokenizer_exact_fit_does_not_warn(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tok(" ".join(f"w{i}" for i in range(511)))
    assert int(ids[0, -1]) == 1 and int(mask.sum()) == 512


def test_tokenizer_missing_file(tmp_path):
    empty = tmp_path / "umt5-xxl"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"umt5-xxl.*tokenizer\.json"):
        Tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "nowhere")


# ------------------------------------------------------------------ encode_prompts / cache


def test_encode_prompts_zeroes_padded_rows_exactly(tok, tiny_encoder):
    prompts = ["a cat", "Tom & Jerry a cat w1 w2"]
    emb = encode_prompts(tiny_encoder, tok, prompts)
    ids, mask = tok(prompts)
    with torch.no_grad():
        raw = tiny_encoder(ids, mask)
    assert emb.shape == (2, 512, tiny_encoder.cfg.dim)
    for row, n in enumerate(mask.sum(1).tolist()):
        pad = emb[row, n:]
        assert bool((pad == 0).all()) and not bool(pad.signbit().any())  # +0.0 exactly
        assert torch.equal(emb[row, :n], raw[row, :n])
        assert bool((raw[row, n:] != 0).any())  # so the zeros really were written
    half = encode_prompts(tiny_encoder, tok, prompts, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, emb.to(torch.bfloat16))


def test_prompt_encoder_encodes_each_text_once(tok, tiny_encoder):
    rows = []
    hook = tiny_encoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        cache = PromptEncoder(tiny_encoder, tok, device="cpu", keep_on_cpu=True)
        first = cache(["a cat", "Tom & Jerry", "a cat"])
        assert rows == [2] and len(cache) == 2
        second = cache(["Tom & Jerry", "w1 w2"])
        assert rows == [2, 1] and "w1 w2" in cache
        again = cache("a cat")
        assert rows == [2, 1]
    finally:
        hook.remove()
    assert first.shape == (3, 512, tiny_encoder.cfg.dim)
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], second[0])
    assert torch.equal(again[0], encode_prompts(tiny_encoder, tok, ["a cat"])[0])
    again.zero_()  # returned tensors are copies, not views of the cache
    assert torch.equal(cache("a cat"), first[:1])
    cache.offload()
    assert next(tiny_encoder.parameters()).device.type == "cpu" and len(cache) == 3
    cache.clear()
    assert len(cache) == 0


def test_encode_on_meta_encoder_is_a_clear_error(tok):
    with torch.device("meta"):
        enc = UMT5Encoder(T5Config(vocab=300, dim=8, dim_attn=8, dim_ffn=8, num_heads=2, num_layers=1,
                                   num_buckets=8))
    with pytest.raises(RuntimeError, match="meta device"):
        encode_prompts(enc, tok, ["a cat"])


# ------------------------------------------------------------------ trimmed encoding


def test_trimmed_encoding_matches_golden_and_padded(golden, tiny_encoder):
    """Each prompt run over its own tokens only: the golden (official, 512 positions) holds."""
    tensors, _ = golden
    ids, mask = tensors["ids"], tensors["mask"]
    lengths = mask.sum(1).tolist()
    seen = []
    hook = tiny_encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            trimmed = tiny_encoder.forward_each([ids[i:i + 1, :n] for i, n in enumerate(lengths)])
            padded = tiny_encoder(ids, mask)
    finally:
        hook.remove()
    assert seen == lengths[:1] + lengths[1:2] + [512]  # really run at 17 and 140 positions
    for i, n in enumerate(lengths):
        assert trimmed[i].shape == (1, n, tiny_encoder.cfg.dim)
        assert (trimmed[i][0] - tensors["hidden"][i, :n]).abs().max() <= GOLDEN_TOL
        # Equal to the padded run up to float32 summation order (kernels pick another order
        # at another length; measured 1e-6 relative here, 3e-6 over many lengths).
        scale = padded[i, :n].abs().max()
        assert (trimmed[i][0] - padded[i, :n]).abs().max() <= 1e-5 * scale


def test_trimmed_equals_padded_encode_prompts(tok, tiny_encoder):
    prompts = ["a cat", "Tom & Jerry a cat w1 w2", " ".join(f"w{i}" for i in range(150)), "<b>"]
    trimmed = encode_prompts(tiny_encoder, tok, prompts, trim=True)
    padded = encode_prompts(tiny_encoder, tok, prompts)
    _, mask = tok(prompts)
    assert trimmed.shape == padded.shape == (4, 512, tiny_encoder.cfg.dim)
    for row, n in enumerate(mask.sum(1).tolist()):
        assert bool((trimmed[row, n:] == 0).all()) and not bool(trimmed[row, n:].signbit().any())
        assert (trimmed[row, :n] - padded[row, :n]).abs().max() <= 1e-5 * padded[row, :n].abs().max()
    # A prompt's embedding depends on that prompt alone, not on the others in its batch.
    alone = encode_prompts(tiny_encoder, tok, prompts[1:2], trim=True)
    assert torch.equal(alone[0], trimmed[1])


def test_prompt_encoder_trim_is_what_load_uses(tok, tiny_encoder):
    cache = PromptEncoder(tiny_encoder, tok, device="cpu", trim=True)
    emb = cache.encode_all(["a cat", "Tom & Jerry"])
    assert torch.equal(emb, encode_prompts(tiny_encoder, tok, ["a cat", "Tom & Jerry"], trim=True))
    assert "a cat" in cache and len(cache) == 2


# ------------------------------------------------------------------ fp16


def test_clamp_fp16_is_wans_guard():
    big = torch.tensor(torch.finfo(torch.float16).max - 1000, dtype=torch.float16).item()  # 64512 in fp16
    x = torch.tensor([65000.0, -3.0, 1.5], dtype=torch.float16)
    assert torch.equal(_clamp_fp16(x), x)  # finite: left alone, as Wan's fp16_clamp does
    y = torch.tensor([float("inf"), 65000.0, -float("inf"), 2.0], dtype=torch.float16)
    assert _clamp_fp16(y).tolist() == [big, big, -big, 2.0]
    z = torch.tensor([float("inf")], dtype=torch.bfloat16)
    assert torch.isinf(_clamp_fp16(z)).all()  # only fp16 is guarded


def test_golden_encoder_runs_finite_in_fp16(golden, recipe_shapes):
    tensors, meta = golden
    sd = recipe_weights(recipe_shapes, meta["weight_seed"])
    enc = UMT5Encoder.from_state_dict(sd, T5Config.from_dict(meta["config"]), dtype=torch.float16)
    with torch.no_grad():
        hidden = enc(tensors["ids"], tensors["mask"])
    assert hidden.dtype == torch.float16 and bool(torch.isfinite(hidden).all())
    ref = tensors["hidden"]
    assert (hidden.float() - ref).norm() / ref.norm() < 0.1
    # An FFN whose output overflows fp16 (residual sum = inf) is clamped after the add, as in
    # Wan's T5SelfAttention, so the following blocks and the final norm stay finite.
    blown = dict(sd)
    blown["blocks.0.ffn.fc2.weight"] = sd["blocks.0.ffn.fc2.weight"] * 3e4  # weights finite, outputs not
    enc = UMT5Encoder.from_state_dict(blown, T5Config.from_dict(meta["config"]), dtype=torch.float16)
    with torch.no_grad():
        x = enc.token_embedding(tensors["ids"][:1, :17])
        assert bool(torch.isinf(x + enc.blocks[0].ffn(enc.blocks[0].norm2(x))).any())  # it does overflow
        out = enc(tensors["ids"][:1, :17])
    assert bool(torch.isfinite(out).all())
