"""Session (one video made chunk by chunk: stop, regenerate from any chunk), the switch decision at a
resume, prompts encoded only where the chunks made need them, and the TAE with moved checkpoints."""
import dataclasses
import json
import threading

import numpy as np
import pytest

import memflow_nb.generation as gen_mod
from conftest import chunk_timeline
from memflow_nb.checkpoints import Checkpoints
from memflow_nb.cli import main as cli_main
from memflow_nb.generation import Session, SessionError, generate
from memflow_nb.decode.tae import TAEDecodeState
from memflow_nb.timeline.clock import frames_of_chunks
from memflow_nb.video import read_video

FOX = "a red fox trotting through fresh snow in a pine forest at dawn, tracking shot"
OWL = "a snowy owl gliding low over the same pine forest at dusk, wide shot"
SEA = "a lighthouse on a cliff during a storm, waves crashing, wide shot"


def tl(*prompts, chunks_each=2, **kw):
    return chunk_timeline(*prompts, chunks_each=chunks_each, height=32, width=32, seed=5, **kw)


def frames(chunks) -> np.ndarray:
    return np.concatenate([c.frames for c in chunks])


def checkpoint_after(pipe, timeline, num_chunks, start=None):
    """Where a plain `generate` of `timeline` stands after chunk `num_chunks - 1`."""
    *_, last = generate(pipe, timeline, start=start, num_chunks=num_chunks, progress=False)
    return last.checkpoint()


def test_stop_from_another_thread_finishes_the_chunk_in_progress_and_starts_no_other(tae_pipe, monkeypatch):
    session, steps = Session(tae_pipe), []
    real_step = gen_mod.step

    def step(*a, **k):
        steps.append(1)
        if len(steps) == 3:  # during chunk 2, as a Stop click would arrive
            clicker = threading.Thread(target=session.stop)
            clicker.start()
            clicker.join()
        return real_step(*a, **k)

    monkeypatch.setattr(gen_mod, "step", step)
    made = [c.index for c in session.generate(tl(FOX, OWL, SEA))]
    assert made == [0, 1, 2] and len(steps) == 3 and len(session) == 3
    reference = frames(generate(tae_pipe, tl(FOX, OWL, SEA), progress=False))
    assert np.array_equal(session.frames, reference[:frames_of_chunks(3)])
    # Continuing from the end of a stopped video makes the rest as if it had never stopped.
    assert [c.index for c in session.regenerate_from(3)] == [3, 4, 5]
    assert np.array_equal(session.frames, reference) and session.switches == [2, 4]


def test_regenerate_from_keeps_earlier_chunks_bit_exact(tae_pipe):
    old, new = tl(FOX, OWL, SEA), tl(FOX, OWL, FOX)
    session = Session(tae_pipe, checkpoints=Checkpoints(every=2))
    before = frames(session.generate(old))
    made = list(session.regenerate_from(3, new))  # between kept checkpoints: chunk 2 is replayed
    kept = frames_of_chunks(3)
    assert [c.index for c in made] == [3, 4, 5] and made[1].switched
    assert np.array_equal(session.frames[:kept], before[:kept])
    assert not np.array_equal(session.frames[kept:], before[kept:])
    assert np.array_equal(session.frames, frames(generate(tae_pipe, new, progress=False)))
    assert session.timeline == new and session.checkpoints.chunks() == [0, 2, 4, 6]


@pytest.mark.parametrize("store", [Checkpoints(every=3), None], ids=["sparse checkpoints", "no checkpoints"])
def test_a_replay_uses_the_timeline_that_made_each_chunk(tae_pipe, store):
    a, b, c = tl(FOX, chunks_each=6), tl(SEA, chunks_each=6), tl(OWL, chunks_each=6)
    session = Session(tae_pipe, checkpoints=store)
    list(session.generate(a))
    list(session.regenerate_from(4, b))  # chunks 0-3 from a, 4-5 from b
    before = session.frames.copy()
    list(session.regenerate_from(5, c))  # the replay to chunk 5 crosses from a (chunk 3) to b (chunk 4)
    at4 = checkpoint_after(tae_pipe, a, 4)
    at5 = checkpoint_after(tae_pipe, b, 5, start=at4)
    expected_tail = frames(generate(tae_pipe, c, start=at5, progress=False))
    kept = frames_of_chunks(5)
    assert np.array_equal(session.frames[:kept], before[:kept])
    assert np.array_equal(session.frames[kept:], expected_tail)
    assert session.switches == [4, 5]


def test_session_refuses_what_it_cannot_do(tae_pipe):
    session = Session(tae_pipe, checkpoints=None)
    with pytest.raises(SessionError, match="generate a video first"):
        session.regenerate_from(0)
    list(session.generate(tl(FOX), num_chunks=2))
    with pytest.raises(SessionError, match="outside the video made so far"):
        session.regenerate_from(3)
    with pytest.raises(SessionError, match=r"the size changed \(32x32 -> 48x48\)"):
        session.regenerate_from(1, height=48, width=48)
    with pytest.raises(SessionError, match="nothing to make from chunk 2"):
        session.regenerate_from(2, num_chunks=2)
    run = session.generate(tl(OWL))
    next(run)
    with pytest.raises(SessionError, match="already generating"):
        session.generate(tl(FOX))
    run.close()
    assert len(session) == 1 and session.timeline == tl(OWL)  # a closed run keeps what it made
    assert len(list(session.generate(tl(FOX), num_chunks=1))) == 1


def test_a_resume_switches_when_the_state_holds_another_prompt(tae_pipe):
    """The new timeline's plan has no switch at chunk 4 (SEA continues), but the checkpoint's state
    was made with OWL: the prompt must switch there, and the result equals a fresh SEA stream's
    continuation decided the same way."""
    old, new = tl(FOX, OWL, SEA), tl(FOX, SEA, SEA)
    start = checkpoint_after(tae_pipe, old, 4)
    first, *_ = generate(tae_pipe, new, start=start, progress=False)
    assert first.index == 4 and first.switched
    again, *_ = generate(tae_pipe, old, start=start, progress=False)
    assert again.index == 4 and again.switched  # old's own plan switches OWL -> SEA at 4
    assert np.array_equal(first.frames, again.frames)  # same state, same prompt, same noise


def test_a_resume_encodes_only_the_prompts_its_chunks_need(tae_pipe):
    encoded = []
    spy = dataclasses.replace(tae_pipe, text=lambda texts: encoded.extend(texts) or tae_pipe.text(texts))
    timeline = tl(FOX, OWL, SEA)
    chunks = list(generate(spy, timeline, progress=False))
    assert encoded == [FOX, OWL, SEA]
    for resume_at, needed in ((4, [SEA]), (3, [SEA]), (5, [])):  # the state already holds the prompt in effect
        encoded.clear()
        again = list(generate(spy, timeline, start=chunks[resume_at - 1].checkpoint(), progress=False))
        assert encoded == needed, resume_at
        assert np.array_equal(frames(again), frames(chunks[resume_at:]))


def test_the_tae_streams_through_generate_with_checkpoints_on_another_device(tae_pipe, monkeypatch):
    moved = []
    real_to = TAEDecodeState.to
    monkeypatch.setattr(TAEDecodeState, "to", lambda self, device: moved.append(str(device)) or real_to(self, device))
    store = Checkpoints(device="cpu")
    timeline = tl(FOX, OWL)
    chunks = list(generate(tae_pipe, timeline, checkpoints=store, progress=False))
    assert [c.frames.shape for c in chunks[:2]] == [(9, 32, 32, 3), (12, 32, 32, 3)]
    assert store.chunks() == [0, 1, 2, 3, 4] and set(moved) == {"cpu"} and len(moved) >= 5
    assert isinstance(store.nearest(2).vae_state, TAEDecodeState)
    tae_bytes = sum(t.untyped_storage().nbytes() for t in store.nearest(2).vae_state.tensors())
    assert 0 < tae_bytes < store.nbytes()
    again = list(generate(tae_pipe, timeline, start=store.nearest(2), progress=False))
    assert np.array_equal(frames(again), frames(chunks[2:]))


def test_the_cli_generates_through_a_session(tmp_path, monkeypatch, capsys):
    runs = []
    real = Session.generate

    def spy(self, timeline, **kw):
        runs.append((self.checkpoints, self.keep_frames, kw["num_chunks"]))
        return real(self, timeline, **kw)

    monkeypatch.setattr(Session, "generate", spy)
    path, out = tmp_path / "t.json", tmp_path / "o.mp4"
    path.write_text(json.dumps(tl(FOX, OWL).to_scope_json()))
    rc = cli_main(["generate", str(path), "-o", str(out), "--model", "tiny", "--frames", "30", "--no-progress"])
    assert rc == 0 and runs == [(None, False, 3)]  # no checkpoints, no frames kept: flat memory
    assert "segments start at chunks [2]; conditioning changes at chunks [2];" in capsys.readouterr().out
    assert read_video(out).shape == (frames_of_chunks(3), 32, 32, 3)
