"""The core engine: golden conformance, cache correctness, functional state, determinism, errors."""
import json

import pytest
import torch

from conftest import make_tiny_model, masked_reference_chunk, same, stream_states, tensors_of, tiny_prompt
from memflow_nb.engine.config import ModelConfig, StreamConfig
from memflow_nb.engine.model import CausalWanModel
from memflow_nb.engine.noise import chunk_noise
from memflow_nb.engine.schedule import denoising_schedule
from memflow_nb.engine.steps import init_state, set_prompt, step, update_memory
from memflow_nb.testing import load_golden, run_golden


# -- conformance with the official code -----------------------------------------------------------

@pytest.mark.parametrize("case", ["dit_a", "dit_a_sma", "single_a"])
def test_golden_matches_official(case, data_dir):
    meta, t = load_golden(data_dir / f"{case}.safetensors")
    out = run_golden(data_dir / f"{case}.safetensors")
    assert out.shape == t["latents"].shape
    diff = (out - t["latents"]).abs().max().item()
    print(f"\n{case}: max|diff| {diff:.2e}")
    assert diff <= 1e-3, f"{case}: max|diff| {diff}"


def test_single_prompt_golden_needs_its_pipeline(tmp_path, data_dir):
    """single_a replayed with the interactive pipeline's bank agrees for chunks 0-1 only."""
    from safetensors.torch import save_file

    meta, t = load_golden(data_dir / "single_a.safetensors")
    meta["stream"]["pipeline"] = "interactive"
    path = tmp_path / "single_a_as_interactive.safetensors"
    save_file(t, str(path), metadata={"meta": json.dumps(meta)})
    diff = (run_golden(path) - t["latents"]).abs().amax(dim=(0, 2, 3, 4))  # per latent frame
    assert diff[:6].max() <= 1e-3 and diff[6:].max() > 0.01
    meta["stream"]["pipeline"] = "batch"
    save_file(t, str(path), metadata={"meta": json.dumps(meta)})
    with pytest.raises(ValueError, match="pipeline='batch'"):
        run_golden(path)


def test_golden_parameter_names_are_wan_names(data_dir):
    recipe = json.loads((data_dir / "recipe_keys.json").read_text())["dit_a"]
    meta, _ = load_golden(data_dir / "dit_a.safetensors")
    with torch.device("meta"):
        model = CausalWanModel(ModelConfig.from_dict(meta["config"]))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == recipe


def test_full_size_preset_has_the_checkpoint_layout(data_dir):
    keys = json.loads((data_dir / "checkpoint_keys.json").read_text())["base_pt_generator"]
    with torch.device("meta"):
        model = CausalWanModel(ModelConfig.from_name("wan2.1-t2v-1.3b"))
    ours = {"model." + k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys
    assert sum(v.numel() for v in model.state_dict().values()) == 1_418_996_800


def test_schedule_is_the_warped_official_one():
    steps = denoising_schedule(StreamConfig())
    assert [round(s.timestep, 2) for s in steps] == [1000.0, 937.5, 833.33, 625.0]
    assert [round(s.sigma, 4) for s in steps] == [1.0, 0.9375, 0.8333, 0.625]
    unwarped = denoising_schedule(StreamConfig(warp_denoising_steps=False))
    assert [s.timestep for s in unwarped] == [1000, 750, 500, 250]


# -- the cache computes what a dense masked recomputation computes -----------------------------------

def test_cached_stream_equals_dense_masked_recompute(tiny_model):
    stream = StreamConfig()
    states, outs = stream_states(tiny_model, 12, stream, hw=(64, 48))
    # Chunks before and after the window rolls, after the bank fills and after compressions.
    for c in (0, 1, 4, 7, 10, 11):
        ref = masked_reference_chunk(tiny_model, states, outs, c, stream)
        assert (ref - outs[c]).abs().max().item() < 2e-5, f"chunk {c}"


def test_workspace_fast_path_equals_reference_path_bitwise(tiny_model, monkeypatch):
    import memflow_nb.engine.steps as steps_mod
    from concat_context import ConcatWorkspace

    def run():
        states, outs = stream_states(tiny_model, 11)
        s = set_prompt(tiny_model, states[-1], tiny_prompt(5))  # a re-cache pass too
        return outs + [step(tiny_model, s)[1]]

    fast = run()
    monkeypatch.setattr(steps_mod, "Workspace", ConcatWorkspace)
    reference = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, reference))


# -- functional state -------------------------------------------------------------------------------

def test_stepping_twice_from_an_old_state_gives_identical_results(tiny_model):
    states, outs = stream_states(tiny_model, 5)
    old = states[3]
    before = [t.clone() for t in tensors_of(old)]
    a_state, a = step(tiny_model, old)
    a2_state, a2 = step(tiny_model, a_state)
    b_state, b = step(tiny_model, old)
    b2_state, b2 = step(tiny_model, b_state)
    assert torch.equal(a, b) and torch.equal(a2, b2)
    assert torch.equal(a, outs[3])
    for t0, t1 in zip(before, tensors_of(old)):
        assert same(t0, t1), "stepping mutated a state the caller still holds"


def test_set_prompt_does_not_touch_the_old_state(tiny_model):
    states, _ = stream_states(tiny_model, 5)
    old = states[5]
    before = [t.clone() for t in tensors_of(old)]
    switched = set_prompt(tiny_model, old, tiny_prompt(9))
    for t0, t1 in zip(before, tensors_of(old)):
        assert same(t0, t1)
    # Re-cache: sink frames keep the old prompt's K/V, the other cached frames are recomputed.
    old_cache, new_cache = dict(old.cache), dict(switched.cache)
    assert old_cache.keys() == new_cache.keys()
    for f in old_cache:
        kept = torch.equal(old_cache[f], new_cache[f])
        assert kept == (f < old.stream.sink_size), f"frame {f}"
    assert switched.position == old.position
    # The old state still continues with the old prompt, exactly as before.
    assert torch.equal(step(tiny_model, old)[1], step(tiny_model, old)[1])


def test_a_recache_stores_only_the_frames_the_cache_keeps(tiny_model):
    """The re-cache runs local_attn_size frames, but only the window the cache keeps is written,
    into one tensor of exactly those frames (no storage kept for frames nobody reads)."""
    states, _ = stream_states(tiny_model, 6)
    old = states[6]
    sc = old.stream
    assert old.position > sc.local_attn_size  # a re-cache that leaves the sink alone
    switched = set_prompt(tiny_model, old, tiny_prompt(9))
    window = [kv for f, kv in switched.cache if f >= sc.sink_size]
    assert len(window) == sc.prev_frames
    assert len({kv.untyped_storage().data_ptr() for kv in window}) == 1
    assert window[0].untyped_storage().nbytes() == sc.prev_frames * window[0].nbytes


def test_unchanged_cache_frames_are_shared_not_copied(tiny_model):
    states, _ = stream_states(tiny_model, 6)
    a, b = dict(states[5].cache), dict(states[6].cache)
    shared = [f for f in a if f in b]
    assert shared and all(a[f] is b[f] for f in shared)
    assert states[6].nbytes() > 0


# -- determinism ------------------------------------------------------------------------------------

def test_same_seed_same_bits_and_seed_matters(tiny_model):
    _, a = stream_states(tiny_model, 3, seed=11)
    _, b = stream_states(tiny_model, 3, seed=11)
    _, c = stream_states(tiny_model, 3, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_chunk_noise_depends_only_on_seed_and_chunk():
    a = chunk_noise(5, 7, (1, 3, 4, 2, 2), 4)
    b = chunk_noise(5, 7, (1, 3, 4, 2, 2), 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(chunk_noise(5, 8, (1, 3, 4, 2, 2), 1)[0], a[0])
    assert not torch.equal(chunk_noise(6, 7, (1, 3, 4, 2, 2), 1)[0], a[0])


def test_explicit_noise_is_used(tiny_model):
    state = init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=32, width=32)
    shape = (1, 3, 16, 4, 4)
    drawn = chunk_noise(0, 0, shape, 4)
    _, a = step(tiny_model, state)
    _, b = step(tiny_model, state, noise=drawn[0], renoise=drawn[1:])
    _, c = step(tiny_model, state, noise=torch.zeros(shape), renoise=drawn[1:])
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- the memory bank --------------------------------------------------------------------------------

def test_bank_holds_the_recorded_frames(tiny_model):
    states, _ = stream_states(tiny_model, 12)
    frames = lambda c: sorted(set(states[c + 1].bank_frames.flatten().tolist()))
    assert states[1].bank_frames.numel() == 0 and states[1].pending_frame == 0
    assert frames(1) == [0] and frames(3) == [0]
    assert frames(4) == [0, 9] and frames(7) == [0, 9, 18]
    assert states[4].pending_frame == 9 and states[10].pending_frame == 27
    after = states[11].bank_frames  # chunk 10 compressed: best 2 of {0, 9, 18} then 27
    assert after.shape[-1] == 3 and (after[..., -1] == 27).all()
    assert set(after[..., :2].flatten().tolist()) <= {0, 9, 18}
    assert [e.kind for e in states[11].memory_log][-1] == "compress"
    assert torch.isfinite(states[11].bank_scores[..., :2]).all()
    # Clean latents of frames in the bank are kept for thumbnails.
    assert set(f for f, _ in states[11].records) == set(after.flatten().tolist()) | {27}


def test_update_memory_on_its_own_is_pure_and_scores_against_given_text(tiny_model):
    states, _ = stream_states(tiny_model, 10)
    s = states[10]
    r1 = update_memory(tiny_model, s)
    r2 = update_memory(tiny_model, s)
    assert torch.equal(r1.bank_frames, r2.bank_frames) and len(s.memory_log) + 1 == len(r1.memory_log)
    other = tiny_model.text_kv(tiny_prompt(42))
    r3 = update_memory(tiny_model, s, text_kv=other)
    assert not torch.equal(r3.memory_log[-1].scores, r1.memory_log[-1].scores)


def test_no_memory_bank_runs(tiny_model):
    states, outs = stream_states(tiny_model, 5, StreamConfig(bank_size=0))
    assert states[-1].bank == () and len(outs) == 5


# -- sizes, SMA and errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("latent_hw", [(12, 20), (30, 52)])
def test_arbitrary_latent_sizes_run(tiny_model, latent_hw):
    h, w = latent_hw
    states, outs = stream_states(tiny_model, 2, hw=(h * 8, w * 8))
    assert outs[0].shape == (1, 3, 16, h, w) and torch.isfinite(outs[1]).all()


def test_sma_changes_memory_attention_only_once_bank_has_data(tiny_model):
    _, off = stream_states(tiny_model, 3)
    _, on = stream_states(tiny_model, 3, StreamConfig(sma=True))
    assert torch.equal(off[0], on[0])  # sink only: top-3 of 3 frames is all of them
    assert not torch.equal(off[2], on[2])


def test_bad_resolution_is_refused(tiny_model):
    with pytest.raises(ValueError, match="height=100 is not divisible by 16"):
        init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=100, width=64)
    with pytest.raises(ValueError, match="width"):
        init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=64, width=0)


def test_wrong_prompt_width_is_refused(tiny_model):
    with pytest.raises(ValueError, match="text_dim=32"):
        init_state(tiny_model, StreamConfig(), torch.zeros(1, 512, 4096), height=64, width=64)
    state = init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=64, width=64)
    with pytest.raises(ValueError, match="text_dim"):
        set_prompt(tiny_model, state, torch.zeros(1, 512, 31))


def test_state_from_another_model_is_refused(tiny_model):
    other = make_tiny_model(seed=1)
    state = init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=64, width=64)
    with pytest.raises(ValueError, match="another model"):
        step(other, state)


def test_bad_stream_config_and_noise_are_refused(tiny_model):
    with pytest.raises(ValueError, match="local_attn_size"):
        StreamConfig(local_attn_size=5, sink_size=3)
    with pytest.raises(ValueError, match="'global attention'.*local_attn_size=21"):
        StreamConfig(local_attn_size=-1)
    with pytest.raises(ValueError, match="empty_frames='none'"):
        StreamConfig(empty_frames="none")
    state = init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=64, width=64)
    with pytest.raises(ValueError, match="noise must have shape"):
        step(tiny_model, state, noise=torch.zeros(1, 3, 16, 4, 4))
    with pytest.raises(ValueError, match="seed"):
        init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=64, width=64, seed=-1)


def test_chunk_length_other_than_3_warns_once_about_the_official_arithmetic(tiny_model):
    import warnings

    stream = StreamConfig(chunk_frames=2, local_attn_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            init_state(tiny_model, stream, tiny_prompt(0), height=32, width=32)
        init_state(tiny_model, StreamConfig(), tiny_prompt(0), height=32, width=32)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "chunk_frames=2" in msgs[0] and "literal 3s" in msgs[0]
