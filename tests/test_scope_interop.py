"""Scope timeline files round-trip without loss: the settings a Timeline does not model, the version
and the pipelineId are written back unchanged; a file for another pipeline loads with one warning;
the file's user LoRAs reach `load(..., loras=...)`."""
import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memflow_nb import pipeline as hub
from memflow_nb.engine.config import ModelConfig
from memflow_nb.lora_stack import lora_scales
from memflow_nb.timeline.model import Timeline

DATA = Path(__file__).resolve().parent.parent / "data"
SCOPE_FILES = sorted(DATA.glob("*.scope.json"))
UI_KEYS = {"id", "isLive", "color", "text"}  # block keys a Timeline does not keep (text: a v1 fallback)

KREA = {
    "version": "2.0",
    "exportedAt": "2026-03-01T10:00:00.000Z",
    "prompts": [
        {"startTime": 0, "endTime": 5, "prompts": [{"text": "a red fox runs through fresh snow", "weight": 100}]},
        {"startTime": 5, "endTime": 10, "prompts": [{"text": "a red fox sleeps in fresh snow", "weight": 100}],
         "transitionSteps": 2, "temporalInterpolationMethod": "linear"},
    ],
    "settings": {
        "pipelineId": "krea-realtime-video",
        "resolution": {"height": 320, "width": 576},
        "seed": 42,
        "denoisingSteps": [1000, 750, 500, 250],
        "manageCache": True,
        "quantization": "fp8_e4m3fn",
        "noiseScale": 0.7,
        "noiseController": {"enabled": True, "strength": [0.1, 0.2]},
        "inputMode": "text",
        "kvCacheAttentionBias": 0.3,
        "loras": [{"id": "l1", "path": "/home/someone/loras/style.safetensors", "scale": 0.8,
                   "mergeMode": "permanent_merge"}],
        "loraMergeStrategy": "permanent_merge",
        "aFutureSetting": {"nested": [1, 2, {"x": None}]},
    },
    "aTopLevelKeyWeDoNotKnow": ["kept"],
}


def load_quietly(source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Timeline.from_scope_json(source)


@pytest.mark.parametrize("path", SCOPE_FILES, ids=lambda p: p.name)
def test_repo_scope_files_load_export_load_without_loss(path):
    raw = json.loads(path.read_text())
    out = load_quietly(path).to_scope_json(exported_at=raw["exportedAt"])
    assert out["version"] == raw["version"]
    assert out["settings"] == raw.get("settings", {})
    assert {k: v for k, v in out.items() if k != "settings"}.keys() == {k for k in raw if k != "settings"}
    blocks = [{k: v for k, v in b.items() if k not in UI_KEYS} for b in raw["prompts"]]
    for b, r in zip(blocks, raw["prompts"]):
        b.setdefault("prompts", [{"text": r.get("text"), "weight": 1.0}])  # a v1 block with text only
    assert out["prompts"] == blocks
    again = Timeline.from_scope_json(out)
    assert again == load_quietly(path)
    assert again.to_scope_json(exported_at=raw["exportedAt"]) == out  # the raw JSON, key for key


def test_other_pipeline_file_round_trips_exactly_and_warns_once(tmp_path):
    path = tmp_path / "krea.json"
    path.write_text(json.dumps(KREA))
    with pytest.warns(UserWarning) as caught:
        tl = Timeline.from_scope_json(path)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "\n" not in msg and "krea.json" in msg and "'krea-realtime-video'" in msg
    used, ignored = msg.split("ignoring")
    assert all(k in used for k in ("prompts", "resolution", "seed", "denoisingSteps"))
    assert all(k in ignored for k in ("manageCache", "quantization", "noiseScale", "noiseController", "inputMode",
                                      "kvCacheAttentionBias", "loras", "loraMergeStrategy", "aFutureSetting"))
    assert "pipelineId" not in ignored and "resolution" not in ignored
    assert tl.scope.settings["pipelineId"] == "krea-realtime-video" and tl.scope.version == "2.0"
    assert tl.to_scope_json(exported_at=KREA["exportedAt"]) == KREA
    out = tmp_path / "back.json"
    tl.to_scope_json(out, exported_at=KREA["exportedAt"])
    with pytest.warns(UserWarning):
        assert json.loads(out.read_text()) == KREA and Timeline.from_scope_json(out) == tl


def test_edits_keep_the_unmodelled_settings():
    tl = load_quietly(KREA).replace(seed=7, height=480, width=832)
    out = tl.to_scope_json()
    assert out["settings"]["seed"] == 7 and out["settings"]["resolution"] == {"height": 480, "width": 832}
    rest = {k: v for k, v in out["settings"].items() if k not in ("seed", "resolution")}
    assert rest == {k: v for k, v in KREA["settings"].items() if k not in ("seed", "resolution")}
    assert hash(tl) == hash(load_quietly(KREA).replace(seed=7, height=480, width=832))


def test_memflow_files_do_not_warn_and_timelines_made_here_are_memflow_2_1():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tl = Timeline.from_scope_json(DATA / "timeline_bad_prompts.scope.json")
        kept = Timeline.from_scope_json(DATA / "timeline_lighthouse.scope.json").scope.settings
    assert tl.scope is None  # nothing beyond a MemFlow 2.1 file
    assert kept == {"pipelineId": "memflow", "inputMode": "text", "manageCache": True, "quantization": None}
    made = Timeline(segments=[{"start": 0, "end": 2, "prompts": ["a heron"]}])
    doc = made.to_scope_json()
    assert doc["version"] == "2.1" and doc["settings"] == {"pipelineId": "memflow"}


def test_seed_from_schema_field_overrides_is_written_back_there():
    doc = copy.deepcopy(KREA)
    del doc["settings"]["seed"]
    doc["settings"]["schemaFieldOverrides"] = {"base_seed": 99, "vae_type": "tae"}
    tl = load_quietly(doc)
    assert tl.seed == 99
    assert tl.to_scope_json(exported_at=doc["exportedAt"]) == doc
    moved = tl.replace(seed=5).to_scope_json()["settings"]
    assert "seed" not in moved and moved["schemaFieldOverrides"] == {"base_seed": 5, "vae_type": "tae"}


def test_scope_loras_from_the_file_settings(tmp_path):
    (tmp_path / "style.safetensors").touch()
    tl = load_quietly(KREA)
    assert tl.scope_loras() == [("/home/someone/loras/style.safetensors", 0.8)]
    assert tl.scope_loras(lora_dir=tmp_path) == [(str(tmp_path / "style.safetensors"), 0.8)]
    assert load_quietly(DATA / "timeline_lighthouse.scope.json").scope_loras() == []


def test_scope_loras_reach_load(tmp_path):
    cfg, rank = ModelConfig.from_name("tiny"), 2
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_blocks_0_ffn_2"  # kohya / musubi names
    save_file({f"{key}.lora_down.weight": torch.randn(rank, cfg.ffn_dim, generator=g),
               f"{key}.lora_up.weight": torch.randn(cfg.dim, rank, generator=g),
               f"{key}.alpha": torch.tensor(2.0)}, str(tmp_path / "style.safetensors"))
    tl = load_quietly(KREA)
    pipe = hub.load("tiny", device="cpu", dtype=torch.float32, progress=False, loras=tl.scope_loras(lora_dir=tmp_path))
    assert lora_scales(pipe.model) == {"style": 0.8}
