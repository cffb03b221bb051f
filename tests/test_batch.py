"""Studies (memflow_nb.batch): plans, shards, resumable files, several processes, metrics.

Every study here runs the tiny random-weight model at 32x48 on the CPU; the multi-process ones
go through torchrun with the gloo backend, as a user would start them.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memflow_nb import batch, metrics as M
from memflow_nb.engine.memory import MemoryEvent
from memflow_nb.study_plan import (Run, Setting, Story, StudyInputError, parse_seeds, parse_settings, plan_runs,
                                   read_stories, shard)

ROOT = Path(__file__).parent.parent
TINY = ["--model", "tiny", "--height", "32", "--width", "48", "--frames", "21", "--switch-frames", "3", "--no-progress"]
RUN_FILES = {"video.mp4", "timeline.scope.json", "bank.json", "record.json"}


def write_stories(path: Path, n: int = 4, bad: dict = None) -> Path:
    """n two-prompt stories, one per line; `bad` replaces some lines {index: text}."""
    lines = [json.dumps({"prompts": [f"story {i}: a lighthouse keeper climbs the stairs",
                                     f"story {i}: the keeper lights the lamp at dusk"]}) for i in range(n)]
    for i, text in (bad or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(args, nproc=2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "memflow_nb.batch", *map(str, args)]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_dirs(out: Path) -> dict:
    return {p.name: p for p in (out / "runs").iterdir() if not p.name.startswith(".")}


# -- plans ---------------------------------------------------------------------------------------

def test_settings_grid_union_and_file(tmp_path):
    grid = parse_settings("bank_size=0,3;sma=off,on")
    assert [s.overrides for s in grid] == [(("bank_size", 0), ("sma", False)), (("bank_size", 0), ("sma", True)),
                                           (("bank_size", 3), ("sma", False)), (("bank_size", 3), ("sma", True))]
    named = parse_settings("off:bank_size=0 | on: | sma:sma=on")
    assert [(s.name, s.overrides) for s in named] == [("off", (("bank_size", 0),)), ("on", ()), ("sma", (("sma", True),))]
    assert parse_settings("denoising_steps=1000/500")[0].apply(named[1].apply(batch.StreamConfig())).denoising_steps == (1000, 500)
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"memory off": {"bank_size": 0}, "every chunk": {"record_interval": 1, "sma": True}}))
    assert [(s.slug, dict(s.overrides)) for s in parse_settings(f)] == [
        ("memory-off", {"bank_size": 0}), ("every-chunk", {"record_interval": 1, "sma": True})]
    assert parse_settings(None) == (Setting("default"),)


@pytest.mark.parametrize("spec, words", [
    ("bank_sise=1", "unknown setting 'bank_sise'"),
    ("sma=maybe", "sma='maybe'"),
    ("local_attn_size=4", "setting 'local_attn_size=4'"),  # rejected by StreamConfig, named
    ("a:sma=on|a:sma=off", "named alike"),
    ("bank_size", "FIELD=VALUE"),
])
def test_bad_settings_name_the_problem(spec, words):
    with pytest.raises(StudyInputError, match=words.replace("(", r"\(").replace("[", r"\[")):
        parse_settings(spec)


def test_seeds():
    assert parse_seeds("0,3-5,3") == (0, 3, 4, 5)
    assert parse_seeds(None) is None
    for bad in ("-1", "5-2", "x"):
        with pytest.raises(StudyInputError, match="--seeds"):
            parse_seeds(bad)


def test_shards_are_deterministic_balanced_and_longest_first():
    stories = [Story(f"s{i}", "f", None, None) for i in range(7)]
    runs = [Run(s, Setting("a"), 0, n) for s, n in zip(stories, [5, 1, 9, 3, 9, 2, 4])]
    parts = shard(runs, 3)
    assert parts == shard(list(reversed(runs)), 3)  # input order does not matter
    assert sorted(r.id for p in parts for r in p) == sorted(r.id for r in runs)  # each run exactly once
    assert [[r.num_chunks for r in p] for p in parts] == [[9, 3], [9, 2], [5, 4, 1]]
    assert [len(p) for p in shard(runs[:1], 4)] == [1, 0, 0, 0]


def test_stories_from_jsonl_scope_and_folder(tmp_path):
    write_stories(tmp_path / "a.jsonl", 3, bad={1: "{not json"})
    (tmp_path / "b.scope.json").write_text((ROOT / "data" / "timeline_lighthouse.scope.json").read_text())
    stories = read_stories(tmp_path, [3], 9)
    assert [s.id for s in stories] == ["a-000", "a-001", "a-002", "b"]
    assert stories[1].error.startswith(f"{tmp_path / 'a.jsonl'} line 2:") and stories[1].timeline is None
    assert stories[0].timeline.chunk_plan() == (0, 1, 1) and stories[3].error is None
    with pytest.raises(StudyInputError, match="never reached"):
        read_stories(tmp_path / "a.jsonl", [30], 9)
    runs = plan_runs(stories, parse_settings("bank_size=0,3"), (1, 2), None)
    assert len(runs) == 16 and len({r.id for r in runs}) == 16
    assert {r.num_chunks for r in runs if r.story.id == "a-001"} == {0}


# -- several processes ------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_make_every_output_exactly_once(tmp_path):
    stories = write_stories(tmp_path / "stories.jsonl", 4)
    out = tmp_path / "study"
    p = torchrun([stories, "--out", out, "--settings", "off:bank_size=0|on:", *TINY])
    log, _ = p.communicate(timeout=400)
    assert p.returncode == 0, log
    runs = run_dirs(out)
    expected = {f"stories-{i:03d}__{s}__seed0" for i in range(4) for s in ("off", "on")}
    assert set(runs) == expected
    assert all({f.name for f in d.iterdir()} == RUN_FILES for d in runs.values())
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")] and not list((out / "errors").iterdir())
    manifest = json.loads((out / "manifest.json").read_text())
    done = [r["run_id"] for rank in manifest["last_invocation"]["ranks"] for r in rank["runs"]]
    assert sorted(done) == sorted(expected)  # every run ran once, on one rank
    assert [len(rank["runs"]) for rank in manifest["last_invocation"]["ranks"]] == [4, 4]
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 8 and set(table.run_id) == expected and set(table["rank"]) == {0, 1}
    assert (table.status == "ok").all() and set(table.bank_size) == {0, 3} and (table.frames == 21).all()
    on = table[table.setting == "on"]
    assert (table[table.setting == "off"].bank_attention_share == 0).all() and (on.bank_attention_share > 0).all()
    segments = pd.read_parquet(out / "segments.parquet")
    assert len(segments) == 16 and list(segments.groupby("run_id").segment.apply(list).iloc[0]) == [0, 1]

    import memflow_nb as mf

    run = runs["stories-002__on__seed0"]
    assert mf.read_video(run / "video.mp4").shape == (21, 32, 48, 3)
    timeline = mf.Timeline.from_scope_json(run / "timeline.scope.json")
    assert timeline.chunk_plan() == (0, 1) and "story 2" in timeline.segments[0].prompts[0].text
    bank = json.loads((run / "bank.json").read_text())
    assert bank["events"] and bank["events"][0]["kind"] == "insert"


@pytest.mark.slow
def test_a_killed_rank_loses_only_its_run_in_progress(tmp_path):
    stories = write_stories(tmp_path / "stories.jsonl", 4)
    out = tmp_path / "study"
    args = [stories, "--out", out, "--settings", "off:bank_size=0|on:", *TINY[:-3], "--frames", "45",
            "--switch-frames", "3", "--no-progress"]
    p = torchrun(args)
    deadline, victim = time.time() + 300, None
    while victim is None and time.time() < deadline and p.poll() is None:
        for d in run_dirs(out).values() if (out / "runs").is_dir() else []:
            victim = json.loads((d / "record.json").read_text())["pid"]
            break
        time.sleep(0.1)
    assert victim is not None, p.communicate()[0]
    os.kill(victim, signal.SIGKILL)
    log, _ = p.communicate(timeout=120)
    assert p.returncode != 0, log
    before = {name: (d / "record.json").stat().st_mtime_ns for name, d in run_dirs(out).items()}
    assert 1 <= len(before) < 8 and not (out / "results.parquet").exists()

    # The rerun (one process now) does only the missing runs and keeps the finished ones untouched.
    r = subprocess.run([sys.executable, "-m", "memflow_nb", "batch", *map(str, args)], env=env(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    after = run_dirs(out)
    assert len(after) == 8 and all((after[n] / "record.json").stat().st_mtime_ns == t for n, t in before.items())
    manifest = json.loads((out / "manifest.json").read_text())
    redone = [x["run_id"] for x in manifest["last_invocation"]["ranks"][0]["runs"]]
    assert sorted(redone) == sorted(set(after) - set(before))
    assert manifest["complete"] and not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]
    assert len(pd.read_parquet(out / "results.parquet")) == 8


# -- failures and interrupts, in this process --------------------------------------------------------

def test_a_bad_line_is_reported_and_the_rest_runs(tmp_path, capsys):
    stories = write_stories(tmp_path / "s.jsonl", 3, bad={1: '{"prompts": ["only one prompt"]}'})
    rc = batch.main([str(stories), "--out", str(tmp_path / "o"), "--table", "csv", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and "s.jsonl line 2: prompts: has 1 prompts" in err
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    assert list(table.status) == ["ok", "failed", "ok"] and "line 2" in table.error[1]
    assert json.loads(table.segment_start_chunk[0]) == [0, 1]  # lists survive as JSON text in CSV
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["failed"] == 1


def test_a_failing_run_is_recorded_then_retried(tmp_path, monkeypatch):
    import memflow_nb.generation as G

    real = G.generate

    def flaky(pipe, timeline, **kw):
        if "story 0" in timeline.segments[0].prompts[0].text:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(pipe, timeline, **kw)

    stories = write_stories(tmp_path / "s.jsonl", 2)
    out = tmp_path / "o"
    monkeypatch.setattr(G, "generate", flaky)
    assert batch.main([str(stories), "--out", str(out), *TINY]) == 1
    err = json.loads((out / "errors" / "s-000__default__seed0.json").read_text())
    assert "out of memory" in err["error"] and "flaky" in err["traceback"]
    assert set(run_dirs(out)) == {"s-001__default__seed0"}
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]  # partial folder removed
    monkeypatch.setattr(G, "generate", real)
    assert batch.main([str(stories), "--out", str(out), *TINY]) == 0
    assert set(run_dirs(out)) == {"s-000__default__seed0", "s-001__default__seed0"}
    assert not list((out / "errors").iterdir())


def test_ctrl_c_keeps_finished_runs_and_removes_the_partial_one(tmp_path, monkeypatch):
    import memflow_nb.generation as G

    real, calls = G.generate, []

    def interrupted(pipe, timeline, **kw):
        calls.append(1)
        for i, ch in enumerate(real(pipe, timeline, **kw)):
            if len(calls) == 2 and i == 1:
                raise KeyboardInterrupt
            yield ch

    stories = write_stories(tmp_path / "s.jsonl", 3)
    out = tmp_path / "o"
    monkeypatch.setattr(G, "generate", interrupted)
    assert batch.main([str(stories), "--out", str(out), *TINY]) == 130
    assert len(run_dirs(out)) == 1 and not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]
    (first,) = run_dirs(out).values()
    stamp = (first / "record.json").stat().st_mtime_ns
    monkeypatch.setattr(G, "generate", real)
    assert batch.main([str(stories), "--out", str(out), *TINY]) == 0
    assert len(run_dirs(out)) == 3 and (first / "record.json").stat().st_mtime_ns == stamp


def test_a_rerun_with_other_options_is_refused(tmp_path, capsys):
    stories = write_stories(tmp_path / "s.jsonl", 1)
    out = tmp_path / "o"
    assert batch.main([str(stories), "--out", str(out), *TINY]) == 0
    other = [a if a != "48" else "64" for a in TINY]
    assert batch.main([str(stories), "--out", str(out), *other]) == 2
    assert "width was 48, now 64" in capsys.readouterr().err
    assert batch.main([str(stories), "--out", str(out), *TINY[:-1], "--height", "30"]) == 2


# -- metrics ---------------------------------------------------------------------------------------

def test_prompt_returns_and_consistency():
    texts = ["a potter shapes a vase at her wheel in the workshop", "the potter walks onto the windy terrace",
             "the kiln glows at night", "the potter sits at her wheel in the workshop again"]
    assert M.prompt_returns(texts) == [None, None, None, 0]
    assert M.prompt_returns(texts, threshold=0.99) == [None] * 4
    f = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [-1.0, 1.0]])
    # per frame t >= 1: (max(0, cos to the first) + max(0, cos to the previous)) / 2, as VBench
    assert M.consistency(f) == pytest.approx(((0 + 0) / 2 + (0 + 1) / 2 + (0 + 2 ** -0.5) / 2) / 3)
    assert np.isnan(M.consistency(f[:1]))
    assert M.clip_score(np.array([[3.0, 0.0], [1.0, 1.0]]), np.array([1.0, 0.0])) == pytest.approx(50 * (1 + 2 ** -0.5))


def _event(chunk, kind, new, after, L=2):
    a = torch.tensor(after).view(L, 1, -1)
    return MemoryEvent(chunk, kind, new, a, a, None, False)


def test_retrieval_by_segment_counts_kept_frames_by_their_segment():
    # 3 chunk frames per chunk; segments: chunks 0-1 -> 0, 2-3 -> 1, 4-5 -> 2
    plan = [0, 0, 1, 1, 2, 2]
    events = [_event(1, "insert", 0, [[0], [0]]), _event(2, "insert", 3, [[0, 3], [0, 3]]),
              _event(3, "insert", 6, [[0, 3, 6], [0, 3, 6]]),
              _event(4, "compress", 9, [[0, 3, 9], [6, 3, 9]]), _event(5, "compress", 12, [[0, 6, 12], [0, 3, 12]])]
    kept, chance = M.retrieval_by_segment(events, plan, 3, 3)
    assert kept.tolist() == [[0, 0, 0], [0, 0, 0], [6, 2, 0]]  # frames 0, 3 are of segment 0; 6, 9 of segment 1
    # chunk 4: recorded before = {0, 3, 6} (2 of segment 0, 1 of segment 1), 4 kept entries
    # chunk 5: recorded before = {0, 3, 6, 9} (2 and 2), 4 kept entries
    assert chance[2].tolist() == pytest.approx([4 * 2 / 3 + 2, 4 / 3 + 2, 0])
    texts = ["alpha beta gamma", "xray yankee zulu", "alpha beta gamma"]
    run, segs = M.memory_metrics(M.segment_spans(plan), texts, {0: 0.0, 4: 0.5}, events, plan, 3)
    assert segs[2]["returns_to"] == 0 and segs[2]["revisit_retrieval"] == pytest.approx(6 / 8)
    assert segs[2]["revisit_chance"] == pytest.approx((4 * 2 / 3 + 2) / 8)
    assert run["revisit_retrieval"] == pytest.approx(0.75) and run["bank_attention_share"] == pytest.approx(0.25)
    assert run["compressions"] == 2 and segs[2]["kept_from_earlier_segments"] == 1.0


def test_revisit_metrics_on_a_story_that_comes_back(tmp_path):
    lines = [json.dumps({"prompts": ["a red fox trots through the snowy pine forest at dawn",
                                     "a grey owl sits on a branch by the frozen river",
                                     "the red fox trots again through the snowy pine forest at dawn"]})]
    (tmp_path / "fox.jsonl").write_text("\n".join(lines) + "\n")
    manifest = batch.run_study(tmp_path / "fox.jsonl", tmp_path / "o", model="tiny", height=32, width=48, frames=69,
                               switch_frames=[6, 12], settings="bank_size=2;record_interval=1", progress=False)
    assert manifest["ok"] == 1
    row = pd.read_parquet(tmp_path / "o" / "results.parquet").iloc[0]
    assert row.returns == 1 and row.compressions > 0 and 0 <= row.revisit_retrieval <= 1
    assert 0 < row.revisit_chance < 1 and list(row.segment_returns_to)[2] == 0
    bank = json.loads((tmp_path / "o" / "runs" / row.run_id / "bank.json").read_text())
    kept = np.array(bank["retrieval_by_segment"]["kept"])
    assert row.revisit_retrieval == pytest.approx(kept[2, 0] / kept[2].sum())


@pytest.fixture(scope="module")
def tiny_eval_models(tmp_path_factory):
    """CLIP and DINOv2 of the real architectures, tiny and randomly initialised, saved locally;
    the CLIP tokenizer is a byte-level one built in memory. Nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config,
                              Dinov2Model, PreTrainedTokenizerFast)

    root = tmp_path_factory.mktemp("eval_models")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    clip = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0, **small),
                      vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    CLIPModel(clip).save_pretrained(root / "clip")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", model_max_length=16).save_pretrained(root / "clip")
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPImageProcessor(**size).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **small)).save_pretrained(root / "dino")
    BitImageProcessor(**size).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def test_feature_metrics_end_to_end_with_tiny_clip_and_dino(tmp_path, tiny_eval_models):
    clip, dino = tiny_eval_models
    stories = write_stories(tmp_path / "s.jsonl", 2)
    out = tmp_path / "o"
    rc = batch.main([str(stories), "--out", str(out), *TINY, "--eval", "--clip-model", str(clip), "--dino-model",
                     str(dino), "--eval-every", "2", "--settings", "bank_size=0,3", "--save-attention"])
    assert rc == 0
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 4
    for col in ("clip_score", "subject_consistency", "background_consistency"):
        assert table[col].notna().all() and table[col].abs().max() <= 100, col
    assert ((table.subject_consistency > -1) & (table.subject_consistency <= 1)).all()
    seg = pd.read_parquet(out / "segments.parquet")
    assert len(seg) == 8 and seg.clip_score.notna().all() and seg.subject_consistency.notna().all()

    # The stored score is CLIP's own: regenerate the run (bit-exact) and score segment 0 again.
    import dataclasses

    import memflow_nb as mf
    from memflow_nb.eval_models import load_evaluator

    rec = json.loads((out / "runs" / table.run_id[0] / "record.json").read_text())
    pipe = mf.load("tiny", device="cpu")
    pipe = dataclasses.replace(pipe, stream=pipe.stream.replace(**{"bank_size": rec["stream"]["bank_size"]}))
    (timeline,) = mf.from_official_jsonl([stories.read_text().splitlines()[0]], [3], num_latent_frames=6)
    video = mf.generate_video(pipe, timeline, seed=0, height=32, width=48, progress=False)
    ev = load_evaluator(str(clip), None, str(dino), None, device="cpu")
    frames = video.frames[:9:2]  # chunk 0 (segment 0) is frames 0..8; every 2nd is read
    feats = ev.features(frames, [rec["segments"][0]["prompt"]])
    assert rec["segments"][0]["clip_score"] == pytest.approx(M.clip_score(feats.clip_images, feats.clip_texts[0]),
                                                             rel=1e-5)
    assert rec["segments"][0]["subject_consistency"] == pytest.approx(M.consistency(feats.dino), rel=1e-5)
    att = np.load(out / "runs" / table.run_id[0] / "attention.npz")
    assert att["group_mass"].shape[-1] == 4 and np.allclose(att["group_mass"].sum(-1), 1, atol=1e-4)


def test_missing_metric_models_offline_say_how_to_fetch(monkeypatch):
    from memflow_nb.eval_models import EvalModelNotFound, load_evaluator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent/cache")
    with pytest.raises(EvalModelNotFound, match="hf download openai/clip-vit-base-patch32 --revision 3d74acf9"):
        load_evaluator(device="cpu")
