"""The decoder protocol: both decoders stream the same frame counts, states move and count bytes,
and the free functions dispatch to any object with the methods."""
import dataclasses

import pytest
import torch

from memflow_nb.decode import (TAEConfig, TAEDecoder, decode_chunk, decode_video, init_decode_state,
                               tensor_bytes)
from memflow_nb.weights import random_module


@pytest.fixture(params=["vae", "tae"])
def decoder(request, tiny_vae):
    if request.param == "vae":
        return tiny_vae
    return random_module(lambda: TAEDecoder(TAEConfig(channels=(8, 8, 8, 8))), 1)


def test_frame_counts_and_size_follow_the_decoder(decoder):
    latents = torch.randn(1, 5, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    assert [decoder.pixel_frames(3), decoder.pixel_frames(3, first=False), decoder.pixel_frames(0)] == [9, 12, 0]
    state, counts = init_decode_state(decoder), []
    for n in (3, 1, 1):
        first = state.latent_frames == 0
        pixels, state = decode_chunk(decoder, latents[:, state.latent_frames:state.latent_frames + n], state)
        counts.append((pixels.shape[1], decoder.pixel_frames(n, first)))
        assert pixels.shape[2:] == (3, 2 * decoder.spatial_stride, 3 * decoder.spatial_stride)
    assert counts == [(9, 9), (4, 4), (4, 4)]
    assert decode_video(decoder, latents).shape[1] == decoder.pixel_frames(5) == 17


def test_state_is_frozen_moves_and_counts_its_bytes(decoder):
    fresh = init_decode_state(decoder)
    assert fresh.tensors() == [] and tensor_bytes(fresh.tensors()) == 0
    _, state = decode_chunk(decoder, torch.zeros(1, 2, 16, 2, 2), fresh)
    tensors = state.tensors()
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors)
    assert tensor_bytes(tensors) == sum(t.untyped_storage().nbytes() for t in tensors)
    moved = state.to("meta")
    assert type(moved) is type(state) and moved is not state
    assert len(moved.tensors()) == len(tensors) and all(t.is_meta for t in moved.tensors())
    assert (moved.latent_frames, moved.latent_shape) == (state.latent_frames, state.latent_shape) == (2, (1, 2, 2))
    assert not any(t.is_meta for t in state.tensors())  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.latent_frames = 0


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10, 4)
    b = torch.zeros(3, dtype=torch.float64)
    assert tensor_bytes([a, a, a[2:5], a.view(40), None, b]) == 10 * 4 * 4 + 3 * 8
    assert tensor_bytes([a.clone(), a]) == 2 * 160


def test_free_functions_dispatch_to_the_methods():
    class Echo:
        """Any object with the protocol's methods is a decoder: pixels are the latents, repeated."""

        def init_state(self):
            return "fresh"

        def decode(self, latents, state, *, times=1):
            return latents.repeat(1, times, 1, 1, 1), f"after {state}"

    x = torch.ones(1, 2, 3, 4, 5)
    assert init_decode_state(Echo()) == "fresh"
    pixels, state = decode_chunk(Echo(), x, "s0", times=2)
    assert pixels.shape == (1, 4, 3, 4, 5) and state == "after s0"
    assert torch.equal(decode_video(Echo(), x), x)
