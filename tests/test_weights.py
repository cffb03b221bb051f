"""Loading real model assets: checkpoint reading, key checks, LoRA merge, hub layout, tiny pipeline.

Every file here is written by the tests with the real names and layout (tiny shapes); the
full-size key lists in tests/data/checkpoint_keys.json are checked on the meta device only.
"""
import gc
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import memflow_nb.weights.dit as dit_mod
from conftest import MF, TARGETS, TINY_T5, WAN, tiny_dit_weights, tiny_lora, write_hub_layout
import memflow_nb.weights.download as download_mod
from memflow_nb.decode import VAEConfig, WanVAEDecoder, decode_chunk, init_decode_state
from memflow_nb.engine.config import ModelConfig
from memflow_nb.engine.model import CausalWanModel
from memflow_nb.engine.steps import init_state, step
from memflow_nb.pipeline import Pipeline, load, tiny_tokenizer
from memflow_nb.text_encoder import T5_PRESETS, T5Config, UMT5Encoder
from memflow_nb.weights import (REPOS, KeyMismatch, UnsafeCheckpoint, WeightsCorrupt, WeightsNotFound,
                                check_state_dict, fetch_weights, infer_dit_config, infer_t5_config, load_dit,
                                load_text_encoder, load_vae, merge_lora, meta_shapes, random_module,
                                read_checkpoint, recipe_weights)
from memflow_nb.weights.dit import dit_state_dict, lora_state_dict

DATA = Path(__file__).parent / "data"
TINY = ModelConfig.from_name("tiny")
RANK = 4  # tiny_lora's default rank
REQUIRED = ["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json", "base.pt",
            "lora.pt"]


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return root, write_hub_layout(root)


def merged_expected(base, lora, scale=1.0) -> dict:
    out = dict(base)
    for i in range(TINY.num_layers):
        for t in TARGETS:
            k = f"base_model.model.blocks.{i}.{t}"
            out[f"blocks.{i}.{t}.weight"] = base[f"blocks.{i}.{t}.weight"] + scale * (
                lora[f"{k}.lora_B.weight"] @ lora[f"{k}.lora_A.weight"])
    return out


def assert_weights(model, want: dict, atol=1e-6):
    sd = model.state_dict()
    assert sorted(sd) == sorted(want)
    bad = [k for k in want if not torch.allclose(sd[k].float(), want[k].float(), atol=atol, rtol=0)]
    assert not bad, bad


# ------------------------------------------------------------------------- the whole pipeline

def test_load_local_dir_offline(hub_dir, no_network):
    root, src = hub_dir
    pipe = load(local_dir=root, device="cpu", dtype=torch.float32, progress=False)
    assert isinstance(pipe, Pipeline) and pipe.name == "memflow" and not pipe.random_weights
    assert pipe.model.cfg == TINY  # inferred from the shapes
    assert_weights(pipe.model, merged_expected(src["base"], src["lora"]))
    # the merge changed every target and nothing else
    sd = pipe.model.state_dict()
    changed = sorted(k for k in sd if not torch.equal(sd[k], src["base"][k]))
    assert changed == sorted(f"blocks.{i}.{t}.weight" for i in range(2) for t in TARGETS)
    assert not pipe.model.training and not any(p.requires_grad for p in pipe.model.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.model.parameters())
    emb = pipe.text(["a cat", "a dog on a skateboard"])
    assert emb.shape == (2, 512, 32) and emb.dtype == torch.float32  # the text encoder's CPU default (issue 11)
    assert pipe.text.encoder.cfg == TINY_T5
    assert isinstance(pipe.vae, WanVAEDecoder) and pipe.vae.config.dim == 8
    vae_sd = pipe.vae.state_dict()
    assert all(torch.equal(vae_sd[k], src["vae"][k]) for k in vae_sd) and len(vae_sd) == 194 - 86


def test_full_size_checkpoint_keys_map_onto_the_13b_model():
    keys = json.loads((DATA / "checkpoint_keys.json").read_text())
    ckpt = {"generator": {k: torch.empty(s, device="meta") for k, s in keys["base_pt_generator"].items()}}
    lora = {"generator_lora": {k: torch.empty(s, device="meta") for k, s in keys["lora_pt"].items()}}
    sd = dit_state_dict(ckpt)
    assert len(sd) == 825 and not any(k.startswith("model.") for k in sd)
    cfg = infer_dit_config(sd)
    assert cfg == ModelConfig.from_name("wan2.1-t2v-1.3b")
    expected = meta_shapes(lambda: CausalWanModel(cfg))
    check_state_dict(expected, sd)
    lsd = lora_state_dict(lora)
    assert len(lsd) == 600
    merged, targets = merge_lora(sd, lsd)
    assert len(targets) == 300
    assert set(targets) == {f"blocks.{i}.{t}.weight" for i in range(30) for t in TARGETS}
    check_state_dict(expected, merged)
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model.load_state_dict(merged, strict=True, assign=True)  # 825 keys, strict
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800


def test_t5_config_inferred_from_the_umt5_xxl_layout():
    cfg = T5_PRESETS["umt5-xxl"]
    with torch.device("meta"):
        sd = UMT5Encoder(cfg).state_dict()
    assert len(sd) == 242 and infer_t5_config(sd) == cfg


# ------------------------------------------------------------------------------- bad files

class RunsCode:
    """Unpickling this runs code (writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("fmt", ["torch_save", "pickle_protocol_2"])
def test_pickle_that_runs_code_is_refused(tmp_path, fmt):
    probe, marker = tmp_path / "probe", tmp_path / "marker"
    pickle.loads(pickle.dumps(RunsCode(probe)))  # the payload is live: plain unpickling runs it
    assert probe.exists()
    path = tmp_path / "base.pt"
    obj = {"generator": {"model.patch_embedding.weight": RunsCode(marker)}}
    if fmt == "torch_save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(UnsafeCheckpoint, match="exec") as ei:
        load_dit(path)
    assert str(path) in str(ei.value) and not marker.exists()


@pytest.mark.parametrize("cut", ["half", "last_30_bytes", "legacy_half", "empty"])
def test_truncated_file_names_it_and_says_redownload(hub_dir, tmp_path, cut):
    src = (hub_dir[0] / MF / "base.pt").read_bytes()
    if cut.startswith("legacy"):
        torch.save({"generator": {"model.x": torch.zeros(1000)}}, tmp_path / "l.pt",
                   _use_new_zipfile_serialization=False)
        src = (tmp_path / "l.pt").read_bytes()
    data = {"half": src[:len(src) // 2], "last_30_bytes": src[:-30], "legacy_half": src[:len(src) // 2],
            "empty": b""}[cut]
    path = tmp_path / "base.pt"
    path.write_bytes(data)
    with pytest.raises(WeightsCorrupt) as ei:
        load_dit(path)
    assert str(path) in str(ei.value) and "download it again" in str(ei.value)


def test_git_lfs_pointer_is_explained(tmp_path):
    path = tmp_path / "lora.pt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 700000000\n")
    with pytest.raises(WeightsCorrupt, match="Git LFS pointer") as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value) and "git lfs pull" in str(ei.value)


def test_wrong_shapes_are_listed_by_name(tmp_path):
    base = tiny_dit_weights()
    base["blocks.0.self_attn.q.bias"] = torch.zeros(65)
    base["blocks.1.norm3.weight"] = torch.zeros(63)
    torch.save({"generator": {"model." + k: v for k, v in base.items()}}, tmp_path / "base.pt")
    with pytest.raises(KeyMismatch) as ei:
        load_dit(tmp_path / "base.pt")
    msg = str(ei.value)
    assert "2 wrong shapes" in msg and str(tmp_path / "base.pt") in msg
    assert "blocks.0.self_attn.q.bias: checkpoint [65], model [64]" in msg
    assert "blocks.1.norm3.weight: checkpoint [63], model [64]" in msg
    assert len(ei.value.mismatched) == 2 and not ei.value.missing and not ei.value.unexpected


def test_missing_and_unexpected_keys_are_listed_together(tmp_path):
    base = tiny_dit_weights()
    dropped = sorted(k for k in base if k.startswith("blocks.1."))[:25]
    for k in dropped:
        del base[k]
    base["blocks.0.extra.weight"] = torch.zeros(3)
    base["pos_emb"] = torch.zeros(3)
    torch.save({"generator": {"model." + k: v for k, v in base.items()}}, tmp_path / "base.pt")
    with pytest.raises(KeyMismatch) as ei:
        load_dit(tmp_path / "base.pt")
    msg, err = str(ei.value), ei.value
    assert "25 missing keys (first 20 of 25)" in msg and "2 unexpected keys" in msg
    assert all(k in msg for k in dropped[:20]) and dropped[24] not in msg
    assert "blocks.0.extra.weight" in msg and "pos_emb" in msg
    assert err.missing == dropped and err.unexpected == ["blocks.0.extra.weight", "pos_emb"]


def test_bad_lora_keys_are_all_listed(tmp_path, hub_dir):
    lora = tiny_lora()
    lora["base_model.model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(RANK, 64)  # no such block
    lora["base_model.model.blocks.0.ffn.2.lora_B.weight"] = torch.zeros(64, RANK + 1)  # rank differs from A
    del lora["base_model.model.blocks.1.cross_attn.o.lora_B.weight"]  # A without B
    lora["base_model.model.blocks.0.ffn.0.lora_magnitude_vector"] = torch.zeros(128)  # DoRA: unsupported
    torch.save(lora, tmp_path / "lora.pt")  # a raw PEFT state dict, no generator_lora wrapper
    with pytest.raises(KeyMismatch) as ei:
        load_dit(hub_dir[0] / MF / "base.pt", tmp_path / "lora.pt")
    msg = str(ei.value)
    assert "4 bad LoRA keys" in msg and str(tmp_path / "lora.pt") in msg
    for name in ("blocks.7.self_attn.q.lora_A", "blocks.0.ffn.2.weight: lora_A [4, 128] and lora_B [64, 5]",
                 "blocks.1.cross_attn.o.weight: has lora_A but not lora_B", "lora_magnitude_vector"):
        assert name in msg, name


def test_failed_load_leaves_no_model_behind(tmp_path, hub_dir):
    lora = tiny_lora()
    lora["base_model.model.blocks.0.ffn.0.lora_B.weight"] = torch.zeros(127, RANK)
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")

    def live_models():
        gc.collect()
        return sum(type(o) is CausalWanModel for o in gc.get_objects())  # type(): no lazy attribute lookups

    before = live_models()
    with pytest.raises(KeyMismatch) as ei:
        load_dit(hub_dir[0] / MF / "base.pt", tmp_path / "lora.pt")
    held, tb = [], ei.value.__traceback__
    while tb is not None:  # nothing the error keeps alive is a module
        held += [v for v in tb.tb_frame.f_locals.values() if isinstance(v, torch.nn.Module)]
        tb = tb.tb_next
    assert held == []
    del ei, tb
    assert live_models() == before


def test_safetensors_dit_and_header_lies(tmp_path):
    base = tiny_dit_weights()
    good = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(base, str(good))
    assert_weights(load_dit(good), base, atol=0)  # unprefixed Wan names load as they are
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]

    def write(name, hdr, payload):
        h = json.dumps(hdr).encode()
        (tmp_path / name).write_bytes(len(h).to_bytes(8, "little") + h + payload)
        return tmp_path / name

    lie_shape = dict(header, **{"head.head.bias": dict(header["head.head.bias"], shape=[128])})
    end = header["blocks.1.ffn.2.weight"]["data_offsets"]
    lie_offset = dict(header, **{"blocks.1.ffn.2.weight": dict(header["blocks.1.ffn.2.weight"],
                                                                data_offsets=[end[0], len(data) + 4096])})
    cases = {
        write("shape.safetensors", lie_shape, data): "head.head.bias: F32[128] needs 512 bytes, the header gives 256",
        write("offset.safetensors", lie_offset, data): "blocks.1.ffn.2.weight: bytes",
        write("cut.safetensors", header, data[:len(data) // 2]): "outside the",
    }
    big = tmp_path / "hdr.safetensors"
    big.write_bytes((10 ** 6).to_bytes(8, "little") + raw[8:200])
    cases[big] = "header claims 1000000 bytes"
    for path, why in cases.items():
        with pytest.raises(WeightsCorrupt) as ei:
            load_dit(path)
        assert str(path) in str(ei.value) and why in str(ei.value), str(ei.value)


def test_dit_variants_ema_fsdp_alpha_and_config(tmp_path, hub_dir):
    base, lora = tiny_dit_weights(), tiny_lora()
    torch.save({"generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in base.items()}},
               tmp_path / "ema.pt")
    torch.save(lora, tmp_path / "lora.pt")
    model = load_dit(tmp_path / "ema.pt", tmp_path / "lora.pt", lora_alpha=2 * RANK)
    assert_weights(model, merged_expected(base, lora, scale=2.0))
    with pytest.raises(KeyMismatch, match="no 'generator_ema'"):
        load_dit(hub_dir[0] / MF / "base.pt", use_ema=True)
    bf16 = load_dit(tmp_path / "ema.pt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    # one shape off a preset: the key it is read from is named, as a KeyMismatch
    other = {k: v for k, v in tiny_dit_weights().items()}
    other["blocks.0.ffn.0.weight"] = torch.zeros(96, 64)
    with pytest.raises(KeyMismatch, match=r"blocks\.0\.ffn\.0\.weight .*ffn_dim=96.*'tiny' preset has 128") as ei:
        infer_dit_config(other)
    assert ei.value.mismatched == ["blocks.0.ffn.0.weight"] and "num_heads" in str(ei.value)
    # a size that matches no preset at all needs the head count
    other["patch_embedding.weight"] = torch.zeros(7, 5, 1, 3, 3)
    with pytest.raises(ValueError, match="match no preset.*num_heads") as ei:
        infer_dit_config(other)
    assert not isinstance(ei.value, KeyMismatch)
    assert infer_dit_config(base, num_heads=8).num_heads == 8


# ---------------------------------------------------------------------------- merged cache

def test_merged_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "w"
    src = write_hub_layout(root)
    base, lora, cache = root / MF / "base.pt", root / MF / "lora.pt", tmp_path / "cache"
    first = load_dit(base, lora, cache_dir=cache)
    first_sd = {k: v.clone() for k, v in first.state_dict().items()}
    del first  # its unmerged tensors are memory-mapped from base.pt, which is rewritten below
    entries = list(cache.glob("dit-*.safetensors"))
    assert len(entries) == 1
    real_read = dit_mod.read_checkpoint
    reads = []
    monkeypatch.setattr(dit_mod, "read_checkpoint", lambda p: reads.append(Path(p)) or real_read(p))
    second = load_dit(base, lora, cache_dir=cache)
    assert reads == []  # neither source was opened
    assert_weights(second, first_sd, atol=0)
    assert second.cfg == TINY and not second.training

    # new weights in base.pt: the old entry no longer applies and is removed
    new_base = tiny_dit_weights(seed=9)
    stat = base.stat()
    torch.save({"generator": {"model." + k: v for k, v in new_base.items()}}, base)
    os.utime(base, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    third = load_dit(base, lora, cache_dir=cache)
    assert reads == [base, lora]
    assert_weights(third, merged_expected(new_base, src["lora"]))
    assert [p.name for p in cache.glob("dit-*.safetensors")] != [p.name for p in entries]
    assert len(list(cache.glob("dit-*.safetensors"))) == 1

    # another dtype is another entry; a damaged entry is rebuilt with a warning
    load_dit(base, lora, cache_dir=cache, dtype=torch.bfloat16)
    assert len(list(cache.glob("dit-*.safetensors"))) == 2
    entry = max(cache.glob("dit-*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring the merged-weights cache"):
        again = load_dit(base, lora, cache_dir=cache, dtype=torch.bfloat16)
    assert_weights(again, merged_expected(new_base, src["lora"]), atol=1e-2)


# ------------------------------------------------------------------------ text encoder, VAE

def test_tokenizer_folder_without_files(hub_dir, tmp_path):
    empty = tmp_path / "umt5-xxl"
    empty.mkdir()
    (empty / "spiece.model").write_bytes(b"x")
    with pytest.raises(WeightsNotFound) as ei:
        load_text_encoder(hub_dir[0] / WAN / "models_t5_umt5-xxl-enc-bf16.pth", empty)
    assert str(empty) in str(ei.value) and "tokenizer.json" in str(ei.value) and "spiece.model" in str(ei.value)


def test_tokenizer_bigger_than_the_encoder_vocab(hub_dir, tmp_path):
    small = {k: v for k, v in recipe_weights(meta_shapes(lambda: UMT5Encoder(
        T5Config(vocab=100, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=1, num_buckets=32))), 0).items()}
    torch.save(small, tmp_path / "t5.pth")
    with pytest.raises(KeyMismatch, match="259 tokens but the encoder"):
        load_text_encoder(tmp_path / "t5.pth", hub_dir[0] / WAN / "google" / "umt5-xxl")


def test_vae_skips_encoder_keys_and_refuses_strays(hub_dir, tmp_path, caplog):
    path = hub_dir[0] / WAN / "Wan2.1_VAE.pth"
    with caplog.at_level("INFO", logger="memflow_nb.weights.decoders"):
        vae = load_vae(path, dtype=torch.bfloat16)
    assert "skipped 86 encoder-only tensors" in caplog.text and str(path) in caplog.text
    assert vae.config == VAEConfig(dim=8) and next(vae.parameters()).dtype == torch.bfloat16
    sd = dict(hub_dir[1]["vae"], **{"decoder.extra.weight": torch.zeros(2)})
    del sd["decoder.head.2.bias"]
    torch.save(sd, tmp_path / "vae.pth")
    with pytest.raises(KeyMismatch) as ei:
        load_vae(tmp_path / "vae.pth")
    assert ei.value.unexpected == ["decoder.extra.weight"] and ei.value.missing == ["decoder.head.2.bias"]


# ------------------------------------------------------------------------------- hub layout

def test_offline_empty_dir_lists_every_file_and_command(tmp_path, no_network):
    empty = tmp_path / "weights"
    with pytest.raises(WeightsNotFound) as ei:
        load(local_dir=empty, revision="abc123", device="cpu", progress=False)
    msg = str(ei.value)
    for f in REQUIRED:
        assert f in msg, f
    assert msg.count("hf download") == 2
    assert (f'hf download Wan-AI/Wan2.1-T2V-1.3B --include "Wan2.1_VAE.pth" --include '
            f'"models_t5_umt5-xxl-enc-bf16.pth" --include "google/umt5-xxl/*" --revision abc123 '
            f'--local-dir "{empty / WAN}"') in msg
    assert 'hf download KlingTeam/MemFlow --include "base.pt" --include "lora.pt" --revision abc123 ' in msg
    assert "HF_HUB_OFFLINE" in msg


def test_offline_partial_dir_lists_only_what_is_missing(hub_dir, tmp_path, no_network):
    root = tmp_path / "w"
    shutil.copytree(hub_dir[0], root)
    (root / MF / "lora.pt").unlink()
    (root / WAN / "google" / "umt5-xxl" / "tokenizer.json").unlink()
    with pytest.raises(WeightsNotFound) as ei:
        load(local_dir=root, device="cpu", progress=False)
    msg = str(ei.value)
    assert "2 file(s)" in msg and "lora.pt" in msg and "base.pt" not in msg
    assert 'hf download KlingTeam/MemFlow --include "lora.pt" --local-dir' in msg
    assert 'hf download Wan-AI/Wan2.1-T2V-1.3B --include "google/umt5-xxl/*" --local-dir' in msg
    assert "Wan2.1_VAE.pth" not in msg


def _fake_hub_cache(cache: Path, src: Path):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    for repo in REPOS:
        commit = "0123456789abcdef0123456789abcdef0123456" + str(REPOS.index(repo))
        d = cache / f"models--{repo.repo_id.replace('/', '--')}"
        shutil.copytree(src / repo.folder, d / "snapshots" / commit)
        (d / "refs").mkdir()
        (d / "refs" / "main").write_text(commit)


def test_hub_cache_offline(hub_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFound) as ei:
        fetch_weights(progress=False)
    msg = str(ei.value)
    assert "Hugging Face cache" in msg and all(f in msg for f in REQUIRED) and "--local-dir" not in msg
    assert 'hf download KlingTeam/MemFlow --include "base.pt" --include "lora.pt"\n' in msg + "\n"
    _fake_hub_cache(tmp_path / "hub", hub_dir[0])
    paths = fetch_weights(progress=False)
    assert paths.base.is_file() and "snapshots" in str(paths.base)
    pipe = load(device="cpu", dtype=torch.float32, progress=False)
    assert_weights(pipe.model, merged_expected(hub_dir[1]["base"], hub_dir[1]["lora"]))


def test_download_path_fetches_only_needed_files_with_pinned_revisions(hub_dir, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns, revision, local_dir, local_files_only):
        calls.append((repo_id, allow_patterns, revision, Path(local_dir), local_files_only))
        folder = next(r.folder for r in REPOS if r.repo_id == repo_id)
        shutil.copytree(hub_dir[0] / folder, local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(download_mod, "_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    root = tmp_path / "w"
    revs = {"Wan-AI/Wan2.1-T2V-1.3B": "r-wan", "KlingTeam/MemFlow": "r-mf"}
    pipe = load(local_dir=root, revision=revs, device="cpu", dtype=torch.float32, progress=False)
    assert calls == [
        ("Wan-AI/Wan2.1-T2V-1.3B", ["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*"],
         "r-wan", root / WAN, False),
        ("KlingTeam/MemFlow", ["base.pt", "lora.pt"], "r-mf", root / MF, False)]
    assert pipe.model.cfg == TINY
    load(local_dir=root, device="cpu", progress=False)  # complete now: no download call
    assert len(calls) == 2
    with pytest.raises(ValueError, match="revision has keys"):
        fetch_weights(root, revision={"Wan-AI/Wan2.1-T2V-14B": "x"})

    def failing(repo_id, **kw):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr("huggingface_hub.snapshot_download", failing)
    with pytest.raises(WeightsNotFound) as ei:
        load(local_dir=tmp_path / "other", device="cpu", progress=False)
    assert "ConnectionError: network is unreachable" in str(ei.value) and str(ei.value).count("hf download") == 2


# ----------------------------------------------------------------------------------- tiny

def test_tiny_pipeline_runs_end_to_end_on_cpu(no_network):
    pipe = load("tiny", seed=0, device="cpu", dtype=torch.float32)
    assert pipe.name == "tiny" and pipe.random_weights and "noise, not pictures" in repr(pipe)
    assert pipe.model.cfg == TINY and pipe.device == torch.device("cpu")
    emb = pipe.text(["a red fox in the snow"])
    assert emb.shape == (1, 512, TINY.text_dim)
    ids, mask = pipe.text.tokenizer("a fox")  # byte-level: one token per byte, then </s>
    want = tiny_tokenizer().encode("a fox").ids
    assert ids[0, :6].tolist() == want and len(set(want[:-1])) == 5 and want[-1] == 1 and mask.sum() == 6
    assert pipe.text.tokenizer.pad_id == 0 and (ids[0, 6:] == 0).all()
    state = init_state(pipe.model, pipe.stream, emb, height=32, width=32)
    state, x0 = step(pipe.model, state)
    assert x0.shape == (1, 3, 16, 4, 4) and torch.isfinite(x0).all()
    pixels, _ = decode_chunk(pipe.vae, x0, init_decode_state(pipe.vae))
    assert pixels.shape == (1, 9, 3, 32, 32) and torch.isfinite(pixels).all()


def test_tiny_pipeline_is_reproducible_and_seeded():
    a, b, c = (load("tiny", seed=s, device="cpu") for s in (0, 0, 1))
    assert a.dtype == torch.float32 and next(a.model.parameters()).dtype == torch.float32  # "auto" on the CPU
    for m in ("model", "vae"):
        sa, sb, sc = (getattr(p, m).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a.text(["x"]), b.text(["x"])) and not torch.equal(a.text(["x"]), c.text(["x"]))
    with pytest.raises(ValueError, match="unknown pipeline"):
        load("huge")


# ------------------------------------------------------------------------ messages, recipe

def test_messages_point_to_readme_sections_that_exist(tmp_path, hub_dir):
    from memflow_nb.weights.errors import README_SECTIONS

    readme = (DATA.parent.parent / "README.md").read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", readme, re.M)}
    assert set(README_SECTIONS) <= headings, set(README_SECTIONS) - headings
    (tmp_path / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    (tmp_path / "cut.pt").write_bytes((hub_dir[0] / MF / "base.pt").read_bytes()[:500])
    messages = []
    for path in (tmp_path / "absent.pt", tmp_path / "lfs.pt", tmp_path / "cut.pt"):
        with pytest.raises((WeightsNotFound, WeightsCorrupt)) as ei:
            read_checkpoint(path)
        messages.append(str(ei.value))
    with pytest.raises(WeightsNotFound) as ei:
        load_text_encoder(hub_dir[0] / WAN / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path)
    messages.append(str(ei.value))
    for msg in messages:
        named = re.findall(r'README, section "([^"]+)"', msg)
        assert named and set(named) <= headings, msg
        assert "docs/" not in msg


def test_random_module_is_the_recipe_cast_and_built_on_meta():
    build = lambda: CausalWanModel(TINY)  # noqa: E731
    model = random_module(build, 7, dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in recipe_weights(meta_shapes(build), 7).items()}
    assert_weights(model, want, atol=0)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert not model.training
    assert not torch.equal(random_module(build, 8).blocks[0].ffn[0].weight, model.blocks[0].ffn[0].weight.float())
