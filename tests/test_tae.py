"""TAE (taew2_1.pth) decoder: the checkpoint layout, streaming exactness, functional state, loading.

The decoder runs at full width (256/128/64/64 channels) with recipe weights on small latents
(4x6), so the real layout is what is tested and the file still runs in seconds.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import memflow_nb.decode.tae as tae_mod
import memflow_nb.weights.download as download_mod
from conftest import run_in_chunks
from memflow_nb.decode import (TAEConfig, TAEDecoder, TAEDecodeState, decode_chunk, decode_video,
                               init_decode_state, to_uint8)
from memflow_nb.decode.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD
from memflow_nb.weights import KeyMismatch, WeightsCorrupt, WeightsNotFound, hf_download_command, recipe_weights
from memflow_nb.weights.decoders import load_tae, load_tae_decoder, split_tae_state_dict
from memflow_nb.weights.download import tae_files


# --------------------------------------------------------------------- the checkpoint layout

def _memblock(i, c_in, c_out):
    return {f"{i}.conv.0.weight": (c_out, 2 * c_in, 3, 3), f"{i}.conv.0.bias": (c_out,),
            f"{i}.conv.2.weight": (c_out, c_out, 3, 3), f"{i}.conv.2.bias": (c_out,),
            f"{i}.conv.4.weight": (c_out, c_out, 3, 3), f"{i}.conv.4.bias": (c_out,)}


def _decoder_layout():
    """`decoder.*` of taew2_1.pth: clamp(0), conv 16->256(1), ReLU(2), then per stage three
    MemBlocks, upsample, TGrow (x1, x2, x2: 1x1 conv, no bias), conv3 (no bias); ReLU(21), conv 64->3(22)."""
    d = {"1.weight": (256, 16, 3, 3), "1.bias": (256,)}
    for first, (c, c_next, grow) in zip((3, 9, 15), ((256, 128, 1), (128, 64, 2), (64, 64, 2))):
        for i in range(first, first + 3):
            d.update(_memblock(i, c, c))
        d[f"{first + 4}.conv.weight"] = (c * grow, c, 1, 1)
        d[f"{first + 5}.weight"] = (c_next, c, 3, 3)
    d.update({"22.weight": (3, 64, 3, 3), "22.bias": (3,)})
    return {f"decoder.{k}": v for k, v in d.items()}


def _encoder_layout():
    """`encoder.*` of taew2_1.pth (skipped when loading): conv 3->64(0), then three stages of TPool
    (1x1, time /2, /2, /1), stride-2 conv (no bias), three MemBlocks; conv 64->16(17)."""
    d = {"0.weight": (64, 3, 3, 3), "0.bias": (64,)}
    for first, pool in zip((2, 7, 12), (2, 2, 1)):
        d[f"{first}.conv.weight"] = (64, 64 * pool, 1, 1)
        d[f"{first + 1}.weight"] = (64, 64, 3, 3)
        for i in range(first + 2, first + 5):
            d.update(_memblock(i, 64, 64))
    d.update({"17.weight": (16, 64, 3, 3), "17.bias": (16,)})
    return {f"encoder.{k}": v for k, v in d.items()}


DECODER = _decoder_layout()
ENCODER = _encoder_layout()


def test_decoder_keys_and_shapes_are_the_taew2_1_layout():
    assert len(DECODER) == 64 and len(ENCODER) == 64
    with torch.device("meta"):
        tae = TAEDecoder()
    got = {k: tuple(v.shape) for k, v in tae.state_dict().items()}
    assert got == DECODER
    assert all(p.is_meta for p in tae.parameters())
    assert sum(np.prod(s) for s in DECODER.values()) == 9_844_611
    assert tae.mem_indices == (3, 4, 5, 9, 10, 11, 15, 16, 17)
    cfg = tae.config
    assert (cfg.time_stride, cfg.spatial_stride, cfg.frames_to_trim) == (4, 8, 3)
    assert [cfg.pixel_frames(3), cfg.pixel_frames(3, first=False), cfg.pixel_frames(1)] == [9, 12, 1]


# ---------------------------------------------------------------------------------- decoding

def _random_sd(seed):
    return recipe_weights({**DECODER, **ENCODER}, seed)


@pytest.fixture(scope="module")
def tae():
    dec, skipped = load_tae_decoder(_random_sd(7))  # meta build + assign
    assert skipped == sorted(ENCODER)
    assert not any(p.is_meta or p.requires_grad for p in dec.parameters()) and not dec.training
    return dec


@pytest.fixture(scope="module")
def clip(tae):
    latents = 1.5 * torch.randn(2, 6, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    return latents, decode_video(tae, latents)


def _in_chunks(tae, latents, sizes):
    pixels, counts, state = run_in_chunks(lambda z, st: decode_chunk(tae, z, st), init_decode_state(tae),
                                          latents, sizes)
    assert state.latent_frames == latents.shape[1]
    return pixels, counts


def test_whole_clip_shape_range_and_not_degenerate(clip):
    latents, px = clip
    assert px.shape == (2, 4 * 6 - 3, 3, 32, 48) and px.dtype == torch.float32
    assert px.min() >= -1 and px.max() <= 1
    inside = ((px > -1) & (px < 1)).float().mean().item()
    assert inside > 0.1, "random weights saturate everything: the equality tests would be vacuous"
    assert not torch.equal(px[:, 0], px[:, 1]) and not torch.equal(px[0], px[1])


@pytest.mark.parametrize("sizes", [[3, 3], [1] * 6, [2, 2, 2], [1, 2, 3]])
def test_chunked_decoding_equals_whole(tae, clip, sizes):
    latents, whole = clip
    chunked, counts = _in_chunks(tae, latents, sizes)
    first, *rest = sizes
    assert counts == [4 * first - 3] + [4 * n for n in rest]
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_chunks_of_three_give_9_then_12_frames(tae, clip):
    _, counts = _in_chunks(tae, clip[0], [3, 3])
    assert counts == [9, 12]


def _frame_by_frame(tae, latents):
    """Independent reference: each frame goes depth-first through the layers, like a stream of
    single frames; MemBlocks see their previous input frame, TGrow's channel groups j = 0, 1, ...
    become consecutive frames. Drops the first 3 frames. [B, T, 16, h, w] -> [B, 4T-3, 3, H, W]."""
    layers, memory, out = list(tae.decoder), {}, []

    def run(x, i):
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, tae_mod.MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, tae_mod.TGrow):
                for part in layer.conv(x).chunk(layer.stride, dim=1):
                    run(part, i + 1)
                return
            else:
                x = layer(x)
            i += 1
        out.append(x)

    with torch.no_grad():
        for t in range(latents.shape[1]):
            run(latents[:, t], 0)
    return (torch.stack(out[3:], dim=1).clamp(0, 1) * 2 - 1)


def test_matches_a_frame_by_frame_reference(tae, clip):
    latents, whole = clip
    torch.testing.assert_close(_frame_by_frame(tae, latents[:, :3]), whole[:, :9], rtol=0, atol=1e-5)


def test_tgrow_makes_consecutive_frames_from_channel_groups():
    grow = tae_mod.TGrow(1, 2)
    with torch.no_grad():
        grow.conv.weight.copy_(torch.tensor([1.0, 10.0]).view(2, 1, 1, 1))
    x = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # frames t=0, 1
    assert grow(x).flatten().tolist() == [1.0, 10.0, 2.0, 20.0]


def test_input_clamp_is_tanh_x_over_3_times_3():
    x = torch.tensor([-100.0, -3.0, 0.0, 1.5, 100.0])
    torch.testing.assert_close(tae_mod.Clamp()(x), 3 * torch.tanh(x / 3))
    assert tae_mod.Clamp()(x).abs().max() <= 3


def test_state_is_functional(tae, clip):
    latents = clip[0][:, :6].clone()
    keep = latents.clone()
    s0 = init_decode_state(tae)
    px0, s1 = decode_chunk(tae, latents[:, :3], s0)
    assert all(m is None for m in s0.memory) and s0.latent_frames == 0
    saved = [m.clone() for m in s1.memory]
    a, s2a = decode_chunk(tae, latents[:, 3:], s1)
    b, s2b = decode_chunk(tae, latents[:, 3:], s1)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(s2a.memory, s2b.memory))
    assert all(torch.equal(m, s) for m, s in zip(s1.memory, saved))  # the old state was not touched
    assert torch.equal(latents, keep)
    # the fresh state still starts a clip: same first chunk again, trimmed again
    again, _ = decode_chunk(tae, latents[:, :3], s0)
    assert torch.equal(again, px0)
    assert isinstance(s1, TAEDecodeState) and (s1.latent_frames, s1.latent_shape) == (3, (2, 4, 6))
    assert [tuple(m.shape) for m in s1.memory[::3]] == [(2, 256, 4, 6), (2, 128, 8, 12), (2, 64, 16, 24)]
    with pytest.raises(AttributeError):
        s1.latent_frames = 0


def test_bad_latents_are_refused(tae):
    state = init_decode_state(tae)
    with pytest.raises(ValueError, match="16"):
        decode_chunk(tae, torch.zeros(1, 3, 8, 4, 6), state)
    with pytest.raises(ValueError, match="5-D"):
        decode_chunk(tae, torch.zeros(3, 16, 4, 6), state)
    _, s1 = decode_chunk(tae, torch.zeros(1, 1, 16, 4, 6), state)
    with pytest.raises(ValueError, match="differ from the stream"):
        decode_chunk(tae, torch.zeros(1, 1, 16, 4, 8), s1)


def test_to_uint8_works_on_the_output(clip):
    px = clip[1]
    frames = to_uint8(px[0])
    assert frames.shape == (21, 32, 48, 3) and frames.dtype == np.uint8
    want = ((px[0] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(frames, want)
    assert frames.min() == 0  # raw 0 (black) maps to -1 and then to 0


def test_denormalize_maps_latents_with_the_wan_mean_and_std(tae, clip):
    latents = clip[0][:1, :2]
    light, _ = load_tae_decoder(_random_sd(7), TAEConfig(denormalize=True))
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 1, -1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(decode_video(light, latents), decode_video(tae, latents * std + mean),
                               rtol=0, atol=1e-6)
    assert not torch.equal(decode_video(light, latents), decode_video(tae, latents))


# ----------------------------------------------------------------------------------- loading

@pytest.fixture(scope="module")
def fake_file(tmp_path_factory):
    """A taew2_1.pth with the real key names (encoder and decoder), recipe weights."""
    sd = _random_sd(11)
    path = tmp_path_factory.mktemp("tae") / "taew2_1.pth"
    torch.save(sd, path)
    return path, sd


def _assert_loaded(dec, sd, dtype=torch.float32):
    got = dec.state_dict()
    assert sorted(got) == sorted(DECODER)
    assert all(torch.equal(got[k], sd[k].to(dtype)) for k in got)
    assert all(v.dtype == dtype for v in got.values())
    assert not dec.training and not any(p.requires_grad for p in dec.parameters())


def test_load_from_a_path(fake_file, no_network):
    path, sd = fake_file
    dec = load_tae(path, dtype=torch.bfloat16)
    _assert_loaded(dec, sd, torch.bfloat16)
    assert not dec.config.denormalize
    assert decode_video(dec, torch.zeros(1, 1, 16, 2, 2)).shape == (1, 1, 3, 16, 16)


def test_load_from_local_dir_offline(fake_file, tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, sd = fake_file
    shutil.copy(path, tmp_path / "taew2_1.pth")
    _assert_loaded(load_tae(None, local_dir=tmp_path), sd)
    # the lighttae file expects raw Wan latents: picked from its name
    shutil.copy(path, tmp_path / "lighttaew2_1.pth")
    assert load_tae(None, local_dir=tmp_path, filename="lighttaew2_1.pth").config.denormalize


def test_load_from_the_hub_cache_offline(fake_file, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--lightx2v--Autoencoders"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(fake_file[0], repo / "snapshots" / commit / "taew2_1.pth")
    _assert_loaded(load_tae(None), fake_file[1])


def test_missing_file_offline_gives_the_command(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound) as ei:
        load_tae(None, local_dir=tmp_path / "w", revision="abc")
    msg = str(ei.value)
    assert f'hf download lightx2v/Autoencoders taew2_1.pth --revision abc --local-dir "{tmp_path / "w"}"' in msg
    assert "HF_HUB_OFFLINE" in msg and str(tmp_path / "w" / "taew2_1.pth") in msg


def test_missing_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFound) as ei:
        load_tae(None, repo="daydreamlive/Autoencoders")
    msg = str(ei.value)
    assert msg.count("\n") == 2 and "not in the hub cache" in msg and "--local-dir" not in msg
    assert "\n  hf download daydreamlive/Autoencoders taew2_1.pth\n" in msg


def test_download_call_and_failure(fake_file, tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, *, revision, local_dir, local_files_only):
        calls.append((repo_id, filename, revision, local_dir, local_files_only))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(fake_file[0], Path(local_dir) / filename))

    monkeypatch.setattr(download_mod, "_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    _assert_loaded(load_tae(None, local_dir=tmp_path / "d", revision="r1"), fake_file[1])
    assert calls == [("lightx2v/Autoencoders", "taew2_1.pth", "r1", tmp_path / "d", False)]
    load_tae(None, local_dir=tmp_path / "d")  # there now: no second download
    assert len(calls) == 1

    def failing(*a, **k):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", failing)
    with pytest.raises(WeightsNotFound, match="ConnectionError: network is unreachable") as ei:
        load_tae(None)
    assert hf_download_command(tae_files()) in str(ei.value) == str(ei.value)


def test_truncated_file_names_it(fake_file, tmp_path):
    bad = tmp_path / "taew2_1.pth"
    bad.write_bytes(fake_file[0].read_bytes()[:1_000_000])
    with pytest.raises(WeightsCorrupt) as ei:
        load_tae(bad)
    assert str(bad) in str(ei.value)
    with pytest.raises(WeightsNotFound, match="no such file"):
        load_tae(tmp_path / "absent.pth")


def test_wrong_missing_and_unexpected_keys_are_listed(fake_file, tmp_path):
    sd = dict(fake_file[1])
    sd["decoder.8.weight"] = torch.zeros(64, 256, 3, 3)
    sd["decoder.13.conv.weight"] = torch.zeros(128, 128, 1, 1)  # a TGrow without time growth
    del sd["decoder.22.bias"]
    sd["decoder.23.weight"] = torch.zeros(3)
    bad = tmp_path / "taew2_1.pth"
    torch.save(sd, bad)
    with pytest.raises(KeyMismatch) as ei:
        load_tae(bad)
    e, msg = ei.value, str(ei.value)
    assert str(bad) in msg and "TAE decoder" in msg
    assert e.missing == ["decoder.22.bias"] and e.unexpected == ["decoder.23.weight"]
    assert [m.split(":")[0] for m in e.mismatched] == ["decoder.13.conv.weight", "decoder.8.weight"]
    assert "checkpoint [64, 256, 3, 3], model [128, 256, 3, 3]" in msg


def test_non_tensor_entries_are_refused(tmp_path):
    bad = tmp_path / "taew2_1.pth"
    torch.save({"decoder.1.weight": torch.zeros(1), "note": "hello"}, bad)
    with pytest.raises(WeightsCorrupt, match="non-tensor") as ei:
        load_tae(bad)
    assert str(bad) in str(ei.value)


def test_split_keeps_unknown_keys_for_the_strict_check():
    dec, skipped = split_tae_state_dict({"encoder.0.bias": 0, "decoder.1.bias": 1, "other": 2})
    assert dec == {"decoder.1.bias": 1, "other": 2} and skipped == ["encoder.0.bias"]
