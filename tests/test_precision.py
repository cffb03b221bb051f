"""The compute dtype follows the hardware: bf16 on CUDA >= 8.0, fp16 below, float32 on the CPU."""
import pytest
import torch

import memflow_nb as mf
from memflow_nb import precision
from memflow_nb.precision import choose_dtype, resolve_dtype


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_cuda_dtype_follows_the_capability(monkeypatch, capability, expected):
    # No GPU here: the device query is replaced, as a T4 / A100 / L4 / H100 would answer it.
    monkeypatch.setattr(precision.torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose_dtype("cuda") == expected
    assert resolve_dtype("auto", "cuda:0") == expected
    assert choose_dtype("cuda", capability) == expected


def test_cpu_is_float32_and_an_explicit_dtype_wins():
    assert choose_dtype("cpu") == torch.float32
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16


@pytest.mark.parametrize("bad", [torch.int64, "int8", "bfloat17", 3])
def test_bad_dtype_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(bad, "cpu")


def test_tiny_pipeline_defaults_to_float32_on_the_cpu():
    pipe = mf.load("tiny", device="cpu")
    assert pipe.dtype == torch.float32
    assert {p.dtype for p in pipe.model.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    assert mf.load("tiny", device="cpu", dtype="bf16").dtype == torch.bfloat16


def test_tiny_renders_at_its_default_size_from_the_api(tmp_path):
    from memflow_nb.generation import render_size
    pipe = mf.load("tiny", device="cpu")
    tl = mf.Timeline.from_scope_json("data/timeline_lighthouse.scope.json")
    assert (tl.height, tl.width) != pipe.default_size
    assert render_size(pipe, tl) == pipe.default_size
    assert render_size(pipe, tl, 32, 48) == (32, 48)
    chunk = next(iter(mf.generate(pipe, tl, num_chunks=1, progress=False)))
    assert chunk.frames.shape[1:3] == pipe.default_size
