"""Wan2.1 VAE encoder: golden parity with the official code, causal streaming, loading, bad input.

The golden (tests/data/vae_encode.safetensors) is the official `WanVAE_.encode` with the full-width
recipe weights (seed 21, all 194 keys) on a random 9-frame 32x48 clip; the streaming tests use the
same architecture at width 8.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_in_chunks
from memflow_nb.decode import VAEConfig, WanVAEDecoder, decode_video
from memflow_nb.decode.encoder import (VAEEncodeState, WanVAEEncoder, encode_chunk, encode_video, init_encode_state,
                                       latent_frames, load_vae_encoder)
from memflow_nb.weights import KeyMismatch, recipe_weights
from memflow_nb.weights.decoders import load_vae_decoder

DATA = Path(__file__).parent / "data"
SMALL = VAEConfig(dim=8)


def encode_in_chunks(encoder, pixels, sizes):
    latents, counts, _ = run_in_chunks(lambda x, st: encode_chunk(encoder, x, st), init_encode_state(encoder),
                                       pixels, sizes)
    return latents, counts


@pytest.fixture(scope="module")
def small():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAEEncoder(SMALL).state_dict().items()}
    encoder = load_vae_encoder(recipe_weights(shapes, 7), config=SMALL)
    pixels = torch.rand(2, 13, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return encoder, pixels, encode_video(encoder, pixels)


def test_golden_parity_whole_and_chunked():
    g = load_file(str(DATA / "vae_encode.safetensors"))
    shapes = json.loads((DATA / "recipe_keys.json").read_text())["vae"]
    encoder = load_vae_encoder(recipe_weights(shapes, 21))  # the encoder's 86 of the 194 recipe tensors
    assert len(encoder.state_dict()) == 86
    # the golden stores the official layout [B, C, T, H, W]; the API uses [B, T, C, H, W]
    pixels, latents = g["pixels"].permute(0, 2, 1, 3, 4), g["latents"].permute(0, 2, 1, 3, 4)
    whole = encode_video(encoder, pixels)
    chunked, counts = encode_in_chunks(encoder, pixels, [1, 4, 4])  # the official schedule
    assert whole.shape == latents.shape == (1, 3, 16, 4, 6) and counts == [1, 1, 1]
    diffs = {"whole": (whole - latents).abs().max().item(), "chunks 1,4,4": (chunked - latents).abs().max().item()}
    print("\nVAE encoder golden max|diff|:", {k: f"{v:.2e}" for k, v in diffs.items()},
          f"(latent max |x| {latents.abs().max().item():.2f})")
    assert all(d <= 1e-3 for d in diffs.values()), diffs


def test_streaming_in_any_chunks_equals_whole(small):
    encoder, pixels, whole = small
    assert whole.shape == (2, 4, 16, 3, 5)
    for sizes in ([1, 4, 4, 4], [5, 8], [9, 4], [1, 12]):
        chunked, counts = encode_in_chunks(encoder, pixels, sizes)
        assert counts == [latent_frames(n, i == 0) for i, n in enumerate(sizes)]
        assert (chunked - whole).abs().max().item() <= 1e-5 * whole.abs().max().item(), sizes


def test_encoding_is_causal_and_the_state_is_immutable(small):
    encoder, pixels, whole = small
    changed = pixels.clone()
    changed[:, 9:] = 0  # later frames never change earlier latents
    assert torch.equal(encode_video(encoder, changed)[:, :3], whole[:, :3])
    first, state = encode_chunk(encoder, pixels[:, :5], init_encode_state(encoder))
    a, _ = encode_chunk(encoder, pixels[:, 5:9], state)
    b, _ = encode_chunk(encoder, pixels[:, 5:9], state)
    assert torch.equal(a, b) and isinstance(state, VAEEncodeState) and state.pixel_frames == 5
    assert len(state.tensors()) == encoder.num_cache_slots and state.to("cpu").pixel_shape == (2, 24, 40)


def test_round_trip_shapes_with_the_decoder():
    with torch.device("meta"):
        enc_shapes = {k: tuple(v.shape) for k, v in WanVAEEncoder(SMALL).state_dict().items()}
    encoder = load_vae_encoder(recipe_weights(enc_shapes, 1), config=SMALL)
    pixels = torch.zeros(1, 5, 3, 16, 16)
    latents = encode_video(encoder, pixels)
    with torch.device("meta"):
        dec_shapes = {k: tuple(v.shape) for k, v in WanVAEDecoder(SMALL).state_dict().items()}
    decoder, _ = load_vae_decoder(recipe_weights(dec_shapes, 2), SMALL)
    assert decode_video(decoder, latents).shape == pixels.shape


def test_bad_pixels_are_refused(small):
    encoder, pixels, _ = small
    fresh = init_encode_state(encoder)
    with pytest.raises(ValueError, match="4 channels at dim 2"):
        encode_chunk(encoder, torch.zeros(1, 1, 4, 16, 16), fresh)
    with pytest.raises(ValueError, match="first chunk of a clip needs 1 \\+ 4k frames"):
        encode_chunk(encoder, torch.zeros(1, 4, 3, 16, 16), fresh)
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_chunk(encoder, torch.zeros(1, 1, 3, 12, 16), fresh)
    with pytest.raises(ValueError, match="5-D"):
        encode_chunk(encoder, torch.zeros(3, 16, 16), fresh)
    _, state = encode_chunk(encoder, pixels[:, :1], fresh)
    with pytest.raises(ValueError, match="next chunk of a clip needs a positive multiple of 4"):
        encode_chunk(encoder, pixels[:, 1:4], state)
    with pytest.raises(ValueError, match="differ from the clip's"):
        encode_chunk(encoder, pixels[:1, 1:5], state)


def test_loading_from_the_vae_file_and_refusing_a_decoder_only_one(tmp_path, small):
    encoder, pixels, whole = small
    with torch.device("meta"):
        dec_shapes = {k: tuple(v.shape) for k, v in WanVAEDecoder(SMALL).state_dict().items()}
    full = {**recipe_weights(dec_shapes, 3), **encoder.state_dict()}
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(full, path)
    loaded = load_vae_encoder(path)  # dim read off the file
    assert loaded.config.dim == 8 and torch.equal(encode_video(loaded, pixels), whole)
    decoder_only = tmp_path / "decoder_only.pth"
    torch.save(recipe_weights(dec_shapes, 3), decoder_only)
    with pytest.raises(KeyMismatch, match="decoder_only.pth does not fit the VAE encoder.*full Wan2.1_VAE.pth"):
        load_vae_encoder(decoder_only, config=SMALL)


def test_the_tiny_pipeline_has_a_random_encoder_of_the_tiny_vae_width(pipe):
    import memflow_nb as mf
    from memflow_nb.pipeline import TINY_VAE

    encoder = mf.load_vae_encoder(pipe)  # the tiny pipeline decodes with a TAE; the encoder is the Wan VAE's
    assert encoder.config == TINY_VAE and not any(p.requires_grad for p in encoder.parameters())
    assert encode_video(encoder, torch.zeros(1, 1, 3, 32, 48)).shape == (1, 1, 16, 4, 6)
