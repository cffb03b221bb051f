"""Memory studies: the empty-frame choice, and interventions on the bank (pin, evict, replace,
inject, ablate), each returning a new state and leaving the old one usable."""
import dataclasses

import numpy as np
import pytest
import torch

from conftest import make_tiny_model, masked_reference_chunk, same, stream_states, tensors_of, tiny_prompt
from memflow_nb import interventions as iv
from memflow_nb.engine.config import StreamConfig
from memflow_nb.engine.context import Workspace
from memflow_nb.engine.steps import _clean_pass, init_state, step
from memflow_nb.recording import bank_history, bank_slots, record_attention


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def run10(model):
    """A 64x64 stream 10 chunks in: the bank is full ([0, 9, 18] in every layer, 27 pending)."""
    return stream_states(model, 10)


def chunks(model, state, n):
    out = []
    for _ in range(n):
        state, x0 = step(model, state)
        out.append(x0)
    return state, out


def frames_in(state, layer):
    return set(state.bank_frames[layer].flatten().tolist())


# -- the empty-frame choice ------------------------------------------------------------------------

def test_with_official_settings_no_frame_is_empty(model):
    """At the default sizes the official code never attends to an unwritten frame (chunk 0's sink is
    the chunk itself; the bank shows filled slots only), so both choices give the same bits."""
    _, zeros = stream_states(model, 12)
    _, skip = stream_states(model, 12, StreamConfig(empty_frames="skip"))
    assert all(torch.equal(a, b) for a, b in zip(zeros, skip))


def test_skipping_empty_frames_equals_a_context_without_them(model):
    """With a 6-frame sink, chunk 0 officially attends to 3 sink frames of zeros; skipping them is
    the dense recompute whose context simply lacks them."""
    skip = StreamConfig(sink_size=6, empty_frames="skip")
    states, outs = stream_states(model, 5, skip)
    for c in (0, 1, 4):
        ref = masked_reference_chunk(model, states, outs, c, skip)
        assert (ref - outs[c]).abs().max().item() < 2e-5, f"chunk {c}"
    _, zeros = stream_states(model, 1, skip.replace(empty_frames="zeros"))
    assert (zeros[0] - outs[0]).abs().max().item() > 1e-3  # the zero frames were attended to


def test_skipping_an_evicted_slot_equals_a_bank_without_it(model):
    skip = StreamConfig(empty_frames="skip")
    states, outs = stream_states(model, 5, skip)
    evicted = iv.evict(model, states[5], 0, layers=[1])  # frame 0 leaves layer 1's bank
    states, outs = states + [evicted], list(outs)
    state = evicted
    for _ in range(3):  # chunks 5-7 refresh slots 1 and 2 only
        state, x0 = step(model, state)
        states.append(state)
        outs.append(x0)
    assert states[-1].bank_frames[1, 0, 0] == -1 and states[-1].bank_frames[0, 0, 0] == 0
    oracle_states = states[:6] + states[7:]  # the state after each chunk, as the oracle reads them
    for c in (5, 7):
        ref = masked_reference_chunk(model, oracle_states, outs, c, skip)
        assert (ref - outs[c]).abs().max().item() < 2e-5, f"chunk {c}"
    official = step(model, iv.evict(model, stream_states(model, 5)[0][5], 0, layers=[1]))[1]
    assert not torch.equal(official, outs[5])  # "zeros" attends to the emptied slot


# -- the old state stays usable ---------------------------------------------------------------------

def test_every_intervention_leaves_the_old_state_stepping_to_the_same_bits(model, run10):
    states, _ = run10
    old = states[10]
    before = [t.clone() for t in tensors_of(old)]
    slots_before = bank_slots(old)
    reference = chunks(model, old, 2)[1]
    made = {
        "pin": iv.pin(model, old, 9),
        "evict": iv.evict(model, old, 1),
        "replace": iv.replace_slot(model, old, 0, 24),
        "inject": iv.inject_latents(model, old, torch.randn(1, 1, 16, 8, 8), slot=2, position=4),
        "ablate": iv.ablate(model, old, layers=[0], heads=[1, 2]),
    }
    for name, new in made.items():
        assert new is not old
        out = chunks(model, new, 2)[1]
        if name != "pin":  # a pin changes something only once NAM would drop the frame
            assert not torch.equal(out[1], reference[1]), f"{name} changed nothing"
        assert all(torch.equal(a, b) for a, b in zip(chunks(model, old, 2)[1], reference)), name
    for t0, t1 in zip(before, tensors_of(old)):
        assert same(t0, t1), "an intervention wrote into the old state"
    assert str(bank_slots(old)) == str(slots_before) and old.memory.pins == frozenset() and old.ablations == ()


# -- pin / unpin ------------------------------------------------------------------------------------

def test_a_pinned_frame_survives_compressions_that_would_evict_it(model, run10):
    states, _ = run10
    free, _ = chunks(model, states[10], 6)  # compressions at chunks 10-15
    dropped = sorted((f, l) for l in range(2) for f in {0, 9, 18} - frames_in(free, l))
    assert dropped, "no frame was dropped: the test needs one"
    frame = dropped[0][0]
    pinned = iv.pin(model, states[10], frame)
    state = pinned
    for _ in range(6):
        state, _ = step(model, state)
        assert all(frame in frames_in(state, l) for l in range(2)), f"frame {frame} left the bank"
        assert state.memory_log[-1].kind == "compress"
    assert all(r["pinned"] for r in bank_slots(state) if r["frame"] == frame)
    # Unpinned again, NAM may drop it: the next compressions behave as without the pin.
    free_again = iv.unpin(model, pinned, frame)
    assert free_again.memory.pins == frozenset()
    assert torch.equal(chunks(model, free_again, 2)[1][1], chunks(model, states[10], 2)[1][1])


def test_pins_are_per_layer(model, run10):
    states, _ = run10
    pinned = iv.pin(model, states[10], 0, layers=[1])
    assert pinned.memory.pins == frozenset({(1, 0)})
    rows = {(r["layer"], r["frame"]): r["pinned"] for r in bank_slots(pinned)}
    assert rows[(1, 0)] and not rows[(0, 0)]


# -- evict / replace --------------------------------------------------------------------------------

def test_eviction_and_replacement_show_in_bank_slots_and_history(model, run10):
    states, _ = run10
    s = states[10]
    evicted = iv.evict(model, s, 1, layers=[0])
    rows = {(r["layer"], r["slot"]): r["frame"] for r in bank_slots(evicted)}
    assert rows[(0, 1)] == -1 and rows[(1, 1)] == 9
    assert not evicted.bank[1][0].any() and torch.equal(evicted.bank[1][1], s.bank[1][1])
    assert evicted.memory_log[-1].kind == "evict"
    left = [st for st in bank_history(evicted.memory_log) if st.layer == 0 and st.frame == 9]
    assert left and left[-1].left == 10

    cached = iv.replace_slot(model, s, 1, 24)  # in the cache: the stream's own keys/values
    assert all(r["frame"] == 24 for r in bank_slots(cached) if r["slot"] == 1)
    assert torch.equal(cached.bank[1], dict(s.cache)[24])
    pending = iv.replace_slot(model, s, 0, 27, layers=[1])
    assert torch.equal(pending.bank[0][1], s.pending[1]) and torch.equal(pending.bank[0][0], s.bank[0][0])
    assert pending.memory_log[-1].kind == "replace"


def test_replacing_with_a_frame_known_only_by_its_latents_recomputes_it(model, run10):
    states, outs = run10
    s = states[10]
    assert 19 not in dict(s.cache) and s.position - s.history.shape[1] <= 19  # in the history only
    replaced = iv.replace_slot(model, s, 2, 19)
    oracle = alone_clean_pass(model, s, outs[6][:, 1:2], 19)
    assert torch.equal(replaced.bank[2], oracle)


# -- inject -----------------------------------------------------------------------------------------

def alone_clean_pass(model, state, latents, position):
    """The engine's own clean pass over `latents` at `position` in a fresh stream that skips empty
    frames, so that the frames see nothing but themselves."""
    fresh = init_state(model, StreamConfig(empty_frames="skip"), state.prompt_embeds, height=64, width=64)
    f = latents.shape[1]
    ws = Workspace(fresh, position, position + f, recompute=False)
    assert ws.n_frames == f
    return _clean_pass(model, fresh, latents, ws, "clean", ())


def test_an_injected_frames_keys_equal_a_clean_pass_at_that_position(model, run10):
    states, _ = run10
    s = states[10]
    latents = torch.randn(1, 2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    injected = iv.inject_latents(model, s, latents, slot=1, position=40, layers=[0], label="lighthouse")
    oracle = alone_clean_pass(model, s, latents, 40)
    T = s.tokens_per_frame
    for i in range(2):
        assert torch.equal(injected.bank[1 + i][0], oracle[0, :, :, i * T:(i + 1) * T])
        assert torch.equal(injected.bank[1 + i][1], s.bank[1 + i][1])  # layer 1 untouched
    rows = bank_slots(injected)
    assert [(r["frame"], r["outside"]) for r in rows if r["layer"] == 0] == [
        (0, None), (-2, "lighthouse [0]"), (-3, "lighthouse [1]")]
    stays = [st for st in bank_history(injected.memory_log) if st.outside]
    assert {st.outside for st in stays} == {"lighthouse [0]", "lighthouse [1]"}
    assert {f for f, _ in injected.records} >= {-2, -3}  # kept for thumbnails


def test_an_injected_picture_competes_in_nam_and_shows_in_the_plots(model, run10):
    import matplotlib
    matplotlib.use("Agg")
    from memflow_nb import plots

    states, _ = run10
    injected = iv.pin(model, iv.inject_latents(model, states[10], torch.randn(16, 8, 8), slot=0, label="ref"), -2)
    state, _ = chunks(model, injected, 3)
    assert all(-2 in frames_in(state, l) for l in range(2))
    fig = plots.plot_bank_timeline(state.memory_log)
    assert "O0 = ref" in fig._suptitle.get_text()
    with record_attention(model, cross=False) as rec:
        step(model, state)
    labels = rec.self_attention_summaries[0].key_frames
    assert ("bank", -2, 0) in labels


def test_inject_image_encodes_with_the_vae_encoder(model, run10, pipe):
    import memflow_nb as mf
    from memflow_nb.decode.encoder import encode_video

    states, _ = run10
    encoder = mf.load_vae_encoder(pipe)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    via_image = iv.inject_image(model, states[10], image, encoder=encoder, slot=2, position=3)
    pixels = torch.from_numpy(image).float().div(127.5).sub(1).permute(2, 0, 1)[None, None]
    via_latents = iv.inject_latents(model, states[10], encode_video(encoder, pixels), slot=2, position=3)
    assert torch.equal(via_image.bank[2], via_latents.bank[2])


# -- ablate -----------------------------------------------------------------------------------------

def test_ablating_every_layers_bank_equals_no_bank_from_that_chunk_on(model, run10):
    states, _ = run10
    s = states[8]
    ablated = chunks(model, iv.ablate(model, s), 4)[1]
    no_bank = chunks(model, dataclasses.replace(s, stream=s.stream.replace(bank_size=0)), 4)[1]
    assert all(torch.equal(a, b) for a, b in zip(ablated, no_bank))
    # From the first chunk on: exactly a stream that never had a bank.
    start = init_state(model, StreamConfig(), tiny_prompt(0), height=64, width=64, seed=3)
    from_start = chunks(model, iv.ablate(model, start), 5)[1]
    assert all(torch.equal(a, b) for a, b in zip(from_start, stream_states(model, 5, StreamConfig(bank_size=0))[1]))


def test_ablation_per_head_and_for_a_number_of_chunks(model, run10):
    states, _ = run10
    s = states[10]
    ab = iv.ablate(model, s, layers=[1], heads=[0], chunks=2)
    with record_attention(model, cross=False) as rec:
        two, out = chunks(model, ab, 3)
    mass = {c: rec.select(chunk=c, layer=1)[-1].group_mass()["bank"][0] for c in (10, 11, 12)}  # [H, nq]
    assert (mass[10][0] == 0).all() and (mass[11][0] == 0).all() and (mass[12][0] > 0).all()
    assert (mass[10][1:] > 0).all()
    forever = chunks(model, iv.ablate(model, s, layers=[1], heads=[0]), 3)[1]
    assert torch.equal(out[1], forever[1]) and not torch.equal(out[2], forever[2])
    sink = iv.ablate(model, s, "sink", layers=[0])
    with record_attention(model, cross=False) as rec:
        step(model, sink)
    assert (rec.select(layer=0)[-1].group_mass()["sink"] == 0).all()
    assert (rec.select(layer=1)[-1].group_mass()["sink"] > 0).all()


def test_ablation_with_sma_never_attends_to_masked_frames(model):
    states, _ = stream_states(model, 8, StreamConfig(sma=True))
    with record_attention(model, cross=False) as rec:
        step(model, iv.ablate(model, states[8], layers=[0], heads=[0, 1]))
    s = rec.select(layer=0)[-1]
    bank = s.group_mass()["bank"]
    assert (bank[0, :2] == 0).all() and (bank[0, 2:] > 0).any()
    assert torch.allclose(s.mass.sum(-1), torch.ones(s.mass.shape[:-1]), atol=1e-5)


# -- bad input: one clear error each, the state untouched ---------------------------------------------

def test_bad_interventions_are_refused_and_leave_the_state_alone(model, run10):
    states, _ = run10
    s = states[10]
    before = [t.clone() for t in tensors_of(s)]
    other = make_tiny_model(seed=1)
    pinned2 = iv.pin(model, iv.pin(model, s, 0), 9)
    cases = [
        (lambda: iv.pin(model, pinned2, 18), ValueError, "keeps only bank_size - 1 = 2"),
        (lambda: iv.pin(model, s, 3), ValueError, "frame=3 is neither in the bank"),
        (lambda: iv.evict(model, s, 3), ValueError, "slot=3 is out of range: the bank holds 3"),
        (lambda: iv.evict(model, s, 0, layers=[2]), ValueError, r"layers=\[2\]: give indices in \[0, 2\)"),
        (lambda: iv.evict(model, pinned2, 0), ValueError, "holds pinned frame 0 in layers"),
        (lambda: iv.replace_slot(model, s, 3, 24), ValueError, "slot=3 out of range"),
        (lambda: iv.replace_slot(model, s, 0, 4), ValueError, "frame=4 is not held by this state"),
        (lambda: iv.inject_latents(model, s, torch.randn(2, 16, 8, 8), slot=2), ValueError, "slots 2..2"),
        (lambda: iv.inject_latents(model, s, torch.randn(1, 16, 4, 4), slot=0), ValueError, "latent size"),
        (lambda: iv.inject_latents(model, s, torch.randn(1, 16, 8, 8), slot=0, position=-1), ValueError,
         "position=-1"),
        (lambda: iv.ablate(model, s, heads=[4]), ValueError, r"heads=\[4\]"),
        (lambda: iv.ablate(model, s, "local"), ValueError, "group='local'"),
        (lambda: iv.ablate(model, s, chunks=0), ValueError, "chunks=0"),
        (lambda: iv.unpin(model, s, 0), ValueError, "not pinned"),
        (lambda: iv.evict(other, s, 0), ValueError, "another model"),
        (lambda: iv.pin(other, s, 0), ValueError, "another model"),
    ]
    image_cases = [
        (np.zeros((64, 48, 3), np.uint8), ValueError, "64x48 pixels; this stream is 64x64"),
        (np.zeros((64, 64, 4), np.uint8), ValueError, "3 \\(RGB\\) channels"),
        (np.zeros((2, 64, 64, 3), np.uint8), ValueError, "1 \\+ 4k frames"),
        (np.zeros((64, 64, 3), np.float32), TypeError, "uint8"),
    ]
    for fn, err, msg in cases + [(lambda im=im: iv.inject_image(model, s, im, encoder=None, slot=0), e, m)
                                 for im, e, m in image_cases]:
        with pytest.raises(err, match=msg):
            fn()
    for t0, t1 in zip(before, tensors_of(s)):
        assert same(t0, t1)
    no_bank = init_state(model, StreamConfig(bank_size=0), tiny_prompt(0), height=64, width=64)
    with pytest.raises(ValueError, match="no memory bank"):
        iv.evict(model, no_bank, 0)
