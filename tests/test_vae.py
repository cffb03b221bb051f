"""Wan2.1 VAE decoder: golden parity with the official code, streaming exactness, loading, output.

The golden (tests/data/vae.safetensors) is the full-width VAE with recipe weights (seed 21) at
64x64; the streaming tests use the same architecture at width 8 so they run in a second.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_in_chunks
from memflow_nb.decode import (VAEConfig, VAEDecodeState, WanVAEDecoder, decode_chunk, decode_video,
                               init_decode_state, to_uint8)
from memflow_nb.weights import recipe_weights
from memflow_nb.weights.decoders import load_vae_decoder, split_vae_state_dict

DATA = Path(__file__).parent / "data"
SMALL = VAEConfig(dim=8)


def _decode_in_chunks(vae, latents, sizes, **kw):
    """Decode latents [B, T, ...] in chunks of the given sizes; returns (pixels, per-chunk frame counts)."""
    pixels, counts, _ = run_in_chunks(lambda z, st: decode_chunk(vae, z, st, **kw), init_decode_state(vae),
                                      latents, sizes)
    return pixels, counts


@pytest.fixture(scope="module")
def golden():
    g = load_file(str(DATA / "vae.safetensors"))
    shapes = json.loads((DATA / "recipe_keys.json").read_text())["vae"]
    vae, skipped = load_vae_decoder(recipe_weights(shapes, 21))
    # the golden stores the official layout [B, C, T, H, W]; the API uses [B, T, C, H, W]
    return vae, skipped, g["latents"].permute(0, 2, 1, 3, 4), g["pixels"].permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def small():
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in WanVAEDecoder(SMALL).state_dict().items()}
    vae, _ = load_vae_decoder(recipe_weights(shapes, 5), SMALL)
    latents = torch.randn(2, 7, 16, 3, 5, generator=torch.Generator().manual_seed(0))
    return vae, latents, decode_video(vae, latents)


def test_golden_parity_whole_chunked_and_per_frame(golden):
    vae, skipped, latents, pixels = golden
    assert len(skipped) == 86 and all(k.startswith(("encoder.", "conv1.")) for k in skipped)
    whole = decode_video(vae, latents)
    chunked, counts = _decode_in_chunks(vae, latents, [3, 3])
    # the official schedule (one latent frame at a time) on the first 3 latents keeps the test short
    per_frame = decode_video(vae, latents[:, :3], per_frame=True)
    assert whole.shape == pixels.shape == (1, 21, 3, 64, 64)
    assert counts == [9, 12] and per_frame.shape[1] == 9
    diffs = {name: (out - pixels[:, :out.shape[1]]).abs().max().item()
             for name, out in (("whole", whole), ("chunks of 3", chunked), ("per frame, 3 latents", per_frame))}
    print("\nVAE golden max|diff|:", {k: f"{v:.2e}" for k, v in diffs.items()},
          f"(pixel max |x| {pixels.abs().max().item():.2f})")
    assert all(d <= 1e-3 for d in diffs.values()), diffs


def test_reference_path_equals_chunk_path(small):
    vae, latents, whole = small
    ref = decode_video(vae, latents, per_frame=True)
    assert ref.shape == whole.shape == (2, 1 + 4 * 6, 3, 24, 40)
    assert (ref - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()


def test_decode_chunk_uses_chunk_path_by_default(small):
    vae, latents, _ = small
    calls = []
    hook = vae.decoder.conv1.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[2]))
    try:
        decode_chunk(vae, latents[:, :3], init_decode_state(vae))
        default_calls = list(calls)
        calls.clear()
        decode_chunk(vae, latents[:, :3], init_decode_state(vae), per_frame=True)
    finally:
        hook.remove()
    assert default_calls == [3]  # the whole chunk in one pass
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("sizes", [[1] * 7, [2, 2, 2, 1], [3, 3, 1], [1, 4, 2], [5, 2], [2, 1, 3, 1]])
def test_chunked_decode_equals_whole(small, sizes):
    vae, latents, whole = small
    chunked, counts = _decode_in_chunks(vae, latents, sizes)
    assert counts == [1 + 4 * (sizes[0] - 1)] + [4 * n for n in sizes[1:]]
    assert (chunked - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()


def test_channels_last_3d_matches(small):
    vae, latents, whole = small
    cl, _ = _decode_in_chunks(vae, latents, [3, 4], memory_format=torch.channels_last_3d)
    assert (cl - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()


def test_state_is_functional(small):
    vae, latents, whole = small
    _, s1 = decode_chunk(vae, latents[:, :3], init_decode_state(vae))
    snapshot = [c.clone() for c in s1.caches]
    a, s2 = decode_chunk(vae, latents[:, 3:5], s1)
    other = torch.randn_like(latents[:, 3:5])
    b, _ = decode_chunk(vae, other, s1)  # branch off the same old state with other latents
    a2, s2b = decode_chunk(vae, latents[:, 3:5], s1)
    assert torch.equal(a, a2)
    assert not torch.allclose(a, b)
    assert all(torch.equal(c, s) for c, s in zip(s1.caches, snapshot))
    assert s1.latent_frames == 3 and s2.latent_frames == s2b.latent_frames == 5
    assert (a - whole[:, 9:17]).abs().max().item() <= 1e-5 * whole.abs().max().item()
    fresh = init_decode_state(vae)
    assert isinstance(fresh, VAEDecodeState) and not fresh.first_done
    assert len(fresh.caches) == vae.num_cache_slots == 32 and all(c is None for c in fresh.caches)


def test_decoder_keys_and_shapes_match_checkpoint():
    shapes = json.loads((DATA / "recipe_keys.json").read_text())["vae"]
    with torch.device("meta"):
        vae = WanVAEDecoder(VAEConfig())
    assert all(p.is_meta for p in vae.parameters())
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    want = {k: list(v) for k, v in shapes.items() if k.startswith(("decoder.", "conv2."))}
    assert ours == want
    assert len(ours) + 86 == len(shapes) == 194
    full = {k: torch.empty(0) for k in shapes}
    dec, skipped = split_vae_state_dict(full)
    assert sorted(dec) == sorted(want) and len(skipped) == 86
    # a strict load still fails on a stray key, and on a missing one
    with pytest.raises(RuntimeError, match="Unexpected"):
        vae.load_state_dict({**{k: torch.zeros(v) for k, v in want.items()}, "decoder.extra": torch.zeros(1)},
                            strict=True, assign=True)
    with pytest.raises(RuntimeError, match="Missing"):
        vae.load_state_dict({k: torch.zeros(v) for k, v in want.items() if k != "conv2.bias"},
                            strict=True, assign=True)


def test_to_uint8():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    u = to_uint8(x)
    assert isinstance(u, np.ndarray) and u.dtype == np.uint8 and u.shape == (2, 1, 6, 3)
    assert u[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 ties to even, 191.25 -> 191
    batched = to_uint8(torch.rand(2, 4, 3, 8, 16) * 2 - 1)
    assert batched.shape == (2, 4, 8, 16, 3) and batched.dtype == np.uint8
    with pytest.raises(ValueError, match="3, H, W"):
        to_uint8(torch.zeros(4, 8, 16, 3))


def test_clear_errors(small):
    vae, latents, _ = small
    state = init_decode_state(vae)
    with pytest.raises(ValueError, match="z_dim=16"):
        decode_chunk(vae, torch.zeros(1, 2, 12, 3, 5), state)
    with pytest.raises(ValueError, match="5-D"):
        decode_chunk(vae, torch.zeros(2, 16, 3, 5), state)
    with pytest.raises(ValueError, match="no frames"):
        decode_chunk(vae, latents[:, :0], state)
    _, s1 = decode_chunk(vae, latents[:, :1], state)
    with pytest.raises(ValueError, match="differ from the stream"):
        decode_chunk(vae, latents[:1, 1:2], s1)
