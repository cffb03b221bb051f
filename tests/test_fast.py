"""Speed modes as values: the fast wrapper steps like the model it wraps, and nothing is changed in place."""
import pytest
import torch

from conftest import make_tiny_vae, stream_states, tiny_prompt
from memflow_nb.engine.steps import set_prompt, step
from memflow_nb.fast import FastModel, optimize, optimize_model, settings
from memflow_nb.fast.vae import CompiledVAE


@pytest.fixture
def torch_settings():
    """Restore the process-wide torch settings a speed mode applies."""
    previous = settings.read()
    yield previous
    settings.apply(previous)


def test_wrapper_gives_the_models_numbers_and_leaves_it_alone(tiny_model, torch_settings):
    from torch._dynamo.utils import counters

    params = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    # aot_eager traces the pieces as torch.compile does, without generating kernels (seconds on a CPU).
    fast = optimize_model(tiny_model, "exact", compile_options={"backend": "aot_eager"})
    assert isinstance(fast, FastModel) and fast.graphs is None and fast.attention_backends is None
    graphs_before = counters["stats"]["unique_graphs"]
    plain_states, plain = stream_states(tiny_model, 5)
    fast_states, quick = stream_states(fast, 5)
    assert counters["stats"]["unique_graphs"] > graphs_before, "the compiled pieces never ran"
    assert all(torch.equal(a, b) for a, b in zip(plain, quick))
    # States are interchangeable: one made with the model continues with the wrapper, re-cache included.
    switched = set_prompt(fast, plain_states[5], tiny_prompt(4))
    assert torch.equal(step(fast, switched)[1], step(tiny_model, set_prompt(tiny_model, plain_states[5], tiny_prompt(4)))[1])
    from memflow_nb.recording import record_attention

    with record_attention(fast, layers=[0], cross=False) as rec:  # the wrapper and its model share recordings
        step(tiny_model, plain_states[5])
    assert {s.layer for s in rec.self_attention_summaries} == {0}
    assert type(tiny_model).graphs is None and "graphs" not in vars(tiny_model)
    assert all(torch.equal(v, params[k]) for k, v in tiny_model.state_dict().items())


def test_speed_settings_apply_and_undo(torch_settings):
    wanted = settings.TorchSettings(cudnn_benchmark=not torch_settings.cudnn_benchmark,
                                    recompile_limit=torch_settings.recompile_limit + 3)
    previous = settings.apply(wanted)
    assert previous == torch_settings and settings.read() == wanted
    settings.apply(previous)
    assert settings.read() == torch_settings
    with settings.applied(wanted) as before:
        assert settings.read() == wanted and before == torch_settings
    assert settings.read() == torch_settings


def test_optimize_returns_a_new_pipeline(pipe, torch_settings):
    import dataclasses

    tiny_tae = pipe.vae
    assert optimize(pipe, "exact", graphs=False).vae is tiny_tae  # a TAE is not compiled
    pipe = dataclasses.replace(pipe, vae=make_tiny_vae())  # the tiny pipeline with a Wan VAE
    model, vae, stream = pipe.model, pipe.vae, pipe.stream
    quick = optimize(pipe, "exact", graphs=False)
    assert (pipe.model, pipe.vae, pipe.stream) == (model, vae, stream)  # the same objects, untouched
    assert isinstance(quick.model, FastModel) and quick.model.model is model
    assert isinstance(quick.vae, CompiledVAE) and quick.stream == stream
    shared = {p.data_ptr() for p in vae.parameters()}
    assert {p.data_ptr() for p in quick.vae.parameters()} == shared
    again = optimize(quick, "exact", graphs=False)  # re-optimizing wraps the plain model again
    assert again.model.model is model and again.vae is quick.vae


def test_speed_modes_refuse_what_the_cpu_cannot_do(tiny_model, torch_settings):
    with pytest.raises(ValueError, match="graphs=False"):
        optimize_model(tiny_model, "exact", graphs=True)
    with pytest.raises(RuntimeError, match="fp8"):
        optimize_model(tiny_model, "fast", graphs=False)
    with pytest.raises(ValueError, match="'exact' or 'fast'"):
        optimize_model(tiny_model, "turbo")
    with pytest.raises(TypeError, match="already optimized"):
        optimize_model(optimize_model(tiny_model, "exact", graphs=False), "exact")


def test_workspace_in_a_shared_buffer_attends_like_its_own(tiny_model):
    """What the CUDA-graph runner relies on: the workspace layout of chunk 0 and of the steady
    state, and a workspace kept in a larger, reused buffer giving the same bits."""
    from memflow_nb.engine.context import PassAttention, Workspace
    from memflow_nb.engine.steps import update_memory

    states, _ = stream_states(tiny_model, 12)
    first = Workspace(states[0], 0, 3, recompute=False)
    assert (first.n_frames, first.runs) == (3, ((0, 0, 3),))
    state = update_memory(tiny_model, states[12])
    p0 = state.position
    x = torch.randn(1, 3, 16, 8, 8)
    t = torch.full((1, 3), 937.5)
    outs = []
    for shared in (False, True):
        ws = Workspace(state, p0, p0 + 3, recompute=False)
        assert (ws.n_frames, ws.runs, ws.n_glob) == (15, ((12, 0, 3),), 6)  # sink 3, bank 3, window 9
        if shared:
            T, cfg = ws.T, tiny_model.cfg
            ws.use(torch.randn(cfg.num_layers, 2, 1, (ws.n_frames + 4) * T, cfg.num_heads, cfg.head_dim))
        outs.append(tiny_model(x, t, state.text_kv, ws.rope_start, PassAttention(ws, "denoise", 0)))
    assert torch.equal(outs[0], outs[1])


def test_clean_pass_into_a_given_tensor_equals_the_engines(tiny_model):
    """What the CUDA-graph runner relies on: the clean pass writing every layer's keys/values into
    a static tensor it was given gives the bits the engine's own clean pass returns."""
    from memflow_nb.engine.context import PassAttention, PassKV, Workspace
    from memflow_nb.engine.steps import _clean_pass, update_memory

    states, outs = stream_states(tiny_model, 12)
    state = update_memory(tiny_model, states[11])
    p0, cfg = state.position, tiny_model.cfg
    x0 = outs[11]
    engine = _clean_pass(tiny_model, state, x0, Workspace(state, p0, p0 + 3, recompute=False), "clean", ())
    ws = Workspace(state, p0, p0 + 3, recompute=False)
    out = torch.full((cfg.num_layers, 2, 1, 3 * ws.T, cfg.num_heads, cfg.head_dim), float("nan"))
    rec = PassKV(cfg.num_layers, ws.T, out=out)
    t = torch.zeros(1, 3)
    tiny_model(x0, t, state.text_kv, ws.rope_start, PassAttention(ws, "clean", -1, record=rec), need_output=False)
    assert rec.kv is out and torch.equal(out, engine)
