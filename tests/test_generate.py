"""Front end: streaming generate, fork/resume, video files and the CLI, on the tiny pipeline."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import memflow_nb.generation as gen_mod
from conftest import chunk_timeline
from memflow_nb.cli import main as cli_main
from memflow_nb.generation import Checkpoints, generate, generate_video, resume
from memflow_nb.video import read_video, write_video

A = "a red fox trotting through fresh snow in a pine forest at dawn, soft light, slow tracking shot"
B = "the same red fox curled up asleep under a snowy pine tree at dusk, blue light, static camera"
C = "a lighthouse on a cliff during a storm, waves crashing, lightning over the sea, wide shot"


def timeline(*prompts, chunks_each=3, **kw):
    return chunk_timeline(*prompts, chunks_each=chunks_each, height=64, width=64, **kw)


def test_streaming_yields_each_chunk_as_soon_as_it_is_made(pipe, monkeypatch):
    calls = []
    real_step = gen_mod.step
    monkeypatch.setattr(gen_mod, "step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    it = generate(pipe, timeline(A, B), progress=False)
    first = next(it)
    assert len(calls) == 1 and first.index == 0
    rest = list(it)
    assert [c.index for c in [first] + rest] == list(range(6)) and len(calls) == 6
    assert first.frames.shape == (9, 64, 64, 3) and first.frames.dtype == np.uint8
    assert all(c.frames.shape == (12, 64, 64, 3) for c in rest)
    assert [c.index for c in rest if c.switched] == [3]


def test_same_seed_same_video_and_seed_changes_it(pipe):
    a = generate_video(pipe, timeline(A, B), seed=4, progress=False)
    b = generate_video(pipe, timeline(A, B), seed=4, progress=False)
    c = generate_video(pipe, timeline(A, B), seed=5, progress=False)
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (9 + 12 * 5, 64, 64, 3) and a.switches == [3]


def test_resume_with_nothing_changed_is_bit_exact(pipe):
    tl = timeline(A, B, C)
    ck = Checkpoints(every=3)
    video = generate_video(pipe, tl, seed=1, checkpoints=ck, progress=False)
    assert ck.chunks() == [0, 3, 6, 9]
    for k in (3, 5, 7):  # at a kept checkpoint, and between kept ones (replayed)
        start = resume(pipe, tl, ck, k)
        again = [c.frames for c in generate(pipe, tl, start=start, progress=False)]
        first = 9 + 12 * (k - 1)
        assert np.array_equal(np.concatenate(again), video.frames[first:]), f"resume at chunk {k}"


def test_regenerate_from_here_changes_only_the_future(pipe):
    tl = timeline(A, B, C)
    ck = Checkpoints(every=1)
    video = generate_video(pipe, tl, seed=2, checkpoints=ck, progress=False)
    new_tl = timeline(A, B, A)  # change the last segment's prompt
    start = resume(pipe, tl, ck, 6)
    chunks = list(generate(pipe, new_tl, start=start, checkpoints=ck, progress=False))
    assert chunks[0].index == 6 and chunks[0].switched
    assert not np.array_equal(np.concatenate([c.frames for c in chunks]), video.frames[9 + 12 * 5:])
    # The store now holds the new branch after chunk 6.
    assert ck.chunks() == list(range(10))
    assert torch.equal(ck.nearest(9).state.prompt_embeds, chunks[-1].state.prompt_embeds)


def test_resume_with_a_new_seed_keeps_the_past(pipe):
    tl = timeline(A)
    ck = Checkpoints(every=1)
    video = generate_video(pipe, tl, seed=3, checkpoints=ck, progress=False)
    start = resume(pipe, tl, ck, 2)
    other = list(generate(pipe, tl, start=start, seed=99, progress=False))
    assert other[0].state.seed == 99 and not np.array_equal(other[0].frames, video.frames[9 + 12:9 + 24])


def test_checkpoint_cost_is_about_one_chunk_each(pipe):
    ck1, ck3 = Checkpoints(every=1), Checkpoints(every=3)
    generate_video(pipe, timeline(A, B), checkpoints=ck1, progress=False)
    generate_video(pipe, timeline(A, B), checkpoints=ck3, progress=False)
    assert len(ck1) == 7 and len(ck3) == 3
    assert 0 < ck3.nbytes() < ck1.nbytes()


def test_auto_checkpoints_keep_flat_memory_in_an_endless_stream_and_say_what_they_keep(pipe):
    from memflow_nb.checkpoints import DEFAULT_MAX_COUNT

    ckpts = Checkpoints.auto(pipe)
    cap = ckpts.max_count
    assert cap is not None and 0 < cap <= DEFAULT_MAX_COUNT
    # One prompt: checkpoints that straddle a switch also hold both prompts' text keys (bounded by the cap too).
    tl = chunk_timeline(A, chunks_each=3 * cap * ckpts.every, height=32, width=32)
    sizes = []
    for chunk in generate(pipe, tl, checkpoints=ckpts, progress=False):
        sizes.append((len(ckpts), ckpts.nbytes()))
    last = len(sizes) // ckpts.every * ckpts.every  # the boundary after the last chunk made
    assert ckpts.chunks() == [0] + list(range(last - (cap - 1) * ckpts.every, last + 1, ckpts.every))
    at_cap = next(i for i, (n, _) in enumerate(sizes) if n == cap + 1)
    assert max(b for _, b in sizes[at_cap:]) <= 1.05 * sizes[at_cap][1], "checkpoint memory grows"
    said = repr(ckpts)
    assert f"at most {cap} besides chunk 0's" in said and f"{cap + 1} kept" in said and "chunks 0, " in said


def test_host_copies_run_in_the_background_and_are_waited_for_where_needed(pipe, monkeypatch):
    # The GPU -> host path on the CPU: the copy is a slow function in the store's thread.
    import threading

    import memflow_nb.checkpoints as ck_mod

    chunks = list(generate(pipe, timeline(A), num_chunks=3, progress=False))
    release, threads = threading.Event(), []

    def slow_copy(ck, device, ready):
        threads.append(threading.current_thread().name)
        assert release.wait(10)
        if ck.chunk == 2:
            raise RuntimeError("pinned memory exhausted")
        return dataclasses.replace(ck, seed=ck.seed)  # a copy

    monkeypatch.setattr(ck_mod, "cuda_device", lambda ck: torch.device("cpu"))
    monkeypatch.setattr(ck_mod, "after_queued_work", lambda device: None)
    monkeypatch.setattr(ck_mod, "copy_to_host", slow_copy)
    store = Checkpoints(every=1, device="cpu")
    for ch in chunks[:2]:
        store.add(ch.checkpoint())  # returns while the copy waits
    assert store.chunks() == [1, 2] and len(store) == 2 and "2 still copying" in repr(store)  # repr never waits
    release.set()
    got = store.nearest(1)
    assert got.chunk == 1 and threads[0].startswith("memflow-checkpoint")
    assert torch.equal(got.state.history, chunks[0].state.history)
    with pytest.raises(RuntimeError, match="pinned memory"):
        store.nearest(2)
    assert "1 failed" in repr(store)


def test_video_files_roundtrip(tmp_path):
    frames = (np.random.default_rng(0).random((21, 32, 48, 3)) * 255).astype(np.uint8)
    write_video(tmp_path / "a.mp4", frames)
    back = read_video(tmp_path / "a.mp4")
    assert back.shape == frames.shape
    write_video(tmp_path / "a.gif", frames)
    assert read_video(tmp_path / "a.gif").shape[0] == 21
    with pytest.raises(ValueError, match="unsupported video type"):
        write_video(tmp_path / "a.avi", frames)


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_generates_an_mp4_with_the_right_frames(tmp_path, data_dir, capsys):
    tl = timeline(A, B, chunks_each=2).to_scope_json()
    path = tmp_path / "t.json"
    path.write_text(json.dumps(tl))
    out = tmp_path / "o.mp4"
    rc = cli_main(["generate", str(path), "-o", str(out), "--model", "tiny", "--height", "64", "--width", "96",
                   "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "noise, not pictures" in printed and "45 frames" in printed and str(out) in printed
    frames = read_video(out)
    assert frames.shape == (9 + 12 * 3, 64, 96, 3)


def test_cli_reads_official_jsonl(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompts": [A, B]}) + "\n" + json.dumps({"prompts": [B, C]}) + "\n")
    out = tmp_path / "o.gif"
    rc = cli_main(["generate", str(path), "-o", str(out), "--model", "tiny", "--height", "32", "--width", "32",
                   "--frames", "40", "--switch-frames", "6", "--line", "1", "--no-progress"])
    assert rc == 0
    assert "segments start at chunks [2]; conditioning changes at chunks [2];" in capsys.readouterr().out
    assert read_video(out).shape[0] == 9 + 12 * 3


def test_cli_says_where_segments_start_and_where_the_conditioning_changes(tmp_path, capsys):
    from memflow_nb.timeline.model import Timeline

    # Segment 1 starts at chunk 2 with a 3-step transition: chunk 2 still shows A (t = 0), chunk 3 is
    # half-way; segment 2 cuts in at chunk 4. Two segment starts, two conditioning changes, not the same.
    tl = Timeline(unit="chunks", segments=[
        {"start": 0, "end": 2, "prompts": [A]},
        {"start": 2, "end": 4, "prompts": [B], "transition_steps": 3},
        {"start": 4, "end": 5, "prompts": [C]}])
    path, out = tmp_path / "t.json", tmp_path / "o.gif"
    tl.to_scope_json(path)
    rc = cli_main(["generate", str(path), "-o", str(out), "--model", "tiny", "--height", "32", "--width", "32",
                   "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "5 chunks; segments start at chunks [2, 4]; conditioning changes at chunks [3, 4];" in printed
    assert "prompt switches" not in printed


@pytest.mark.parametrize("args, message", [
    (["missing.json"], "no such file"),
    (["BAD", "--height", "100", "--width", "64"], "not divisible by 16"),
    (["BAD", "-o", "x.avi"], "unsupported video type"),
    (["BADTL"], "prompts.0.prompts.0.text"),
])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, message):
    good = tmp_path / "t.json"
    good.write_text(json.dumps(timeline(A).to_scope_json()))
    bad_tl = tmp_path / "bad.json"
    bad = timeline(A).to_scope_json()
    bad["prompts"][0]["prompts"][0]["text"] = "   "
    bad_tl.write_text(json.dumps(bad))
    argv = ["generate"] + [str(good) if a == "BAD" else str(bad_tl) if a == "BADTL" else
                           str(tmp_path / a) if a.endswith(".json") else a for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "o.mp4")]
    rc = cli_main(argv + ["--model", "tiny", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_runs_as_a_module(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(timeline(A, chunks_each=1).to_scope_json()))
    r = subprocess.run([sys.executable, "-m", "memflow_nb", "generate", str(path), "-o", str(tmp_path / "o.mp4"),
                        "--model", "tiny", "--height", "32", "--width", "32", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
