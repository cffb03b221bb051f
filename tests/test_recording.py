"""Inspection: pooled attention equals a brute-force softmax, recording changes nothing, budgets hold."""
import pytest
import torch

import memflow_nb.engine.context as context_mod
from conftest import make_tiny_model, stream_states
from memflow_nb.engine.config import StreamConfig
from memflow_nb.engine.steps import step
from memflow_nb.recording import bank_history, bank_slots, bank_thumbnails, bank_timeline, record_attention


def run(model, n_chunks, stream=StreamConfig()):
    """The states and outputs of a 48x64 stream of n_chunks chunks."""
    return stream_states(model, n_chunks, stream, hw=(48, 64))


def test_recording_changes_no_output_bit(tiny_model):
    states, plain = run(tiny_model, 6)
    with record_attention(tiny_model) as rec:
        _, recorded = run(tiny_model, 6)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert rec.self_attention_summaries and rec.cross_attention_summaries


def test_nothing_is_registered_when_off(tiny_model):
    assert not tiny_model.observers
    with pytest.raises(RuntimeError):
        with record_attention(tiny_model):
            raise RuntimeError("a failing cell")
    assert not tiny_model.observers


def test_a_recording_sees_only_its_model_in_its_thread(tiny_model):
    import threading

    other = make_tiny_model(seed=1)
    other_states, _ = run(other, 2)
    states, _ = run(tiny_model, 2)
    with record_attention(tiny_model, cross=False) as rec:
        step(other, other_states[2])  # another model, same thread
        worker = threading.Thread(target=step, args=(tiny_model, states[2]))  # same model, another thread
        worker.start()
        worker.join()
        assert rec.self_attention_summaries == [] and rec.memory_events == []
        step(tiny_model, states[2])
    assert {s.chunk for s in rec.self_attention_summaries} == {2} and len(rec.memory_events) == 1
    assert not tiny_model.observers and not other.observers


def test_observers_given_to_one_call(tiny_model):
    from memflow_nb.recording import AttentionRecording

    states, _ = run(tiny_model, 2)
    rec = AttentionRecording(layers=None, kinds=("denoise", "clean"), steps=None, cross=True,
                             block_bytes=1 << 20, max_bytes=1 << 24)
    step(tiny_model, states[2], observers=[rec])
    step(tiny_model, states[2])  # not given: not seen
    kinds = [s.kind for s in rec.self_attention_summaries]
    assert kinds.count("denoise") == 4 * tiny_model.cfg.num_layers and "clean" in kinds
    assert len(rec.cross_attention_summaries) == 4 * tiny_model.cfg.num_layers + tiny_model.cfg.num_layers - 1


def test_pooled_mass_equals_brute_force_softmax(tiny_model, monkeypatch):
    states, _ = run(tiny_model, 5)
    state = states[4]  # chunk 4: sink, two bank slots, rolled local window
    maps = []

    def explicit_sdpa(q, k, v, backends=None):
        # The slow way: the full probability map, kept, then the output from it.
        p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5, dim=-1)
        maps.append(p)
        return torch.einsum("bhqk,bkhd->bqhd", p, v)

    monkeypatch.setattr(context_mod, "sdpa", explicit_sdpa)
    T = state.tokens_per_frame
    per_query_row = 2 * tiny_model.cfg.num_heads * 14 * T * 4  # fp32 logits + probs of 14 key frames
    with record_attention(tiny_model, cross=False, block_bytes=3 * per_query_row) as rec:  # many blocks of 3 queries
        step(tiny_model, state)
    rows = [s for s in rec.self_attention_summaries if s.kind == "denoise"]
    assert len(rows) == len(maps[:len(rows)]) and len(rows) == 4 * tiny_model.cfg.num_layers
    for summary, p in zip(rows, maps):
        B, H, Lq, Lk = p.shape
        brute = torch.zeros(B, H, Lq // T, Lk // T)
        for qf in range(Lq // T):
            for kf in range(Lk // T):
                block = p[:, :, qf * T:(qf + 1) * T, kf * T:(kf + 1) * T]
                brute[:, :, qf, kf] = block.sum(-1).mean(-1)
        assert torch.allclose(summary.mass, brute, atol=1e-5)
        assert torch.allclose(summary.mass.sum(-1), torch.ones(B, H, Lq // T), atol=1e-5)
    labels = rows[0].key_frames
    assert [g for g, _, _ in labels] == ["sink"] * 3 + ["bank"] * 2 + ["local"] * 6 + ["current"] * 3
    assert [f for g, f, _ in labels] == [0, 1, 2, 0, 9] + list(range(6, 15))
    assert rec.peak_block_bytes == 3 * per_query_row


def test_cross_attention_mass_is_a_distribution_over_text_tokens(tiny_model):
    states, _ = run(tiny_model, 2)
    with record_attention(tiny_model, layers=[1]) as rec:
        step(tiny_model, states[2])
    assert {s.layer for s in rec.cross_attention_summaries} == {1}
    m = rec.cross_attention_summaries[0].mass
    assert m.shape[-1] == tiny_model.cfg.text_len
    assert torch.allclose(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5)


def test_sma_recording_scatters_selected_frames(tiny_model):
    states, _ = run(tiny_model, 8, StreamConfig(sma=True))
    with record_attention(tiny_model, cross=False) as rec:
        step(tiny_model, states[8])
    s = rec.self_attention_summaries[0]
    glob = [i for i, (g, _, _) in enumerate(s.key_frames) if g in ("sink", "bank")]
    assert len(glob) == 6
    # Each head keeps 3 of the 6 global frames: exactly 3 non-zero columns among them.
    assert ((s.mass[..., glob] > 0).sum(-1) == 3).all()
    assert torch.allclose(s.mass.sum(-1), torch.ones(s.mass.shape[:-1]), atol=1e-5)


def test_recorded_bank_refreshes_follow_the_record_schedule(tiny_model):
    with record_attention(tiny_model, layers=[], cross=False) as rec:
        states, _ = run(tiny_model, 14)  # chunk 12 records frame 36; chunk 13 takes it in
    events = rec.memory_events
    assert [(e.chunk, e.new_frame, e.kind) for e in events][:4] == [
        (1, 0, "insert"), (2, 0, "insert"), (3, 0, "insert"), (4, 9, "insert")]
    assert {e.new_frame for e in events} == {0, 9, 18, 27, 36}
    assert all(e.kind == "compress" for e in events if e.chunk >= 10)
    assert all(e.scores is not None and torch.isfinite(e.scores).all() for e in events if e.kind == "compress")
    assert len(events) == len(states[-1].memory_log)


def test_budget_caps_what_is_kept(tiny_model):
    states, _ = run(tiny_model, 3)
    with pytest.warns(UserWarning, match="budget"):
        with record_attention(tiny_model, max_bytes=2000) as rec:
            step(tiny_model, states[3])
    assert rec.truncated and 0 < rec.nbytes() <= 2000
    with record_attention(tiny_model, block_bytes=1 << 20) as big:
        step(tiny_model, states[3])
    assert not big.truncated and big.peak_block_bytes <= 1 << 20


def test_layer_by_key_frame_view(tiny_model):
    states, _ = run(tiny_model, 5)
    with record_attention(tiny_model) as rec:
        step(tiny_model, states[5])
    mass, labels = rec.layer_by_key_frame(chunk=5)
    assert mass.shape == (tiny_model.cfg.num_layers, tiny_model.cfg.num_heads, len(labels))
    assert torch.allclose(mass.sum(-1), torch.ones(mass.shape[:2]), atol=1e-5)


def test_bank_views(tiny_model, tiny_vae):
    states, _ = run(tiny_model, 14)
    s = states[-1]
    rows = bank_slots(s)
    assert len(rows) == tiny_model.cfg.num_layers * 3 and all(r["frame"] >= 0 for r in rows)
    stays = bank_history(s.memory_log)
    first = [st for st in stays if st.frame == 0]
    assert first and all(st.entered == 1 for st in first)
    current = {(st.layer, st.frame) for st in stays if st.left is None}
    assert current == {(r["layer"], r["frame"]) for r in rows}
    tl = bank_timeline(s.memory_log, tiny_model.cfg.num_layers, 3)
    assert tl.shape == (len(s.memory_log), tiny_model.cfg.num_layers, 3) and tl[0, 0, 0] == 0
    thumbs = bank_thumbnails(tiny_vae, s)
    assert set(thumbs) == {f for f, _ in s.records}
    img = next(iter(thumbs.values()))
    assert img.shape == (48, 64, 3) and img.dtype.name == "uint8"


def test_plots_render(tiny_model, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from memflow_nb.notebook.plots import plot_attention_mass, plot_bank_timeline, plot_retrieval_scores

    states, _ = run(tiny_model, 13)
    with record_attention(tiny_model) as rec:
        s, _ = step(tiny_model, states[-1])
    log = s.memory_log
    figs = {
        "bank": plot_bank_timeline(log),
        "attn": plot_attention_mass(rec, chunk=13),
        "scores": plot_retrieval_scores(log, segments=[(0, 7, "prompt A"), (7, 14, "prompt B")]),
    }
    for name, fig in figs.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert path.stat().st_size > 5000
    # The bank panel shows exactly the timeline's frames for layer 0.
    img = figs["bank"].axes[0].images[0].get_array()
    tl = bank_timeline(log, tiny_model.cfg.num_layers, 3)
    assert (img.filled(-1).T == tl[:, 0, :]).all()
    with pytest.raises(ValueError, match="memory log is empty"):
        plot_bank_timeline(())
