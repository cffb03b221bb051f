"""Shared test helpers, in one place (no test module imports another).

Plain functions (make_tiny_model, tiny_prompt, stream_states, write_hub_layout, ...) are imported
by the tests that use them (`from conftest import ...`); fixtures are kept for objects a test only
receives (tiny_model, tiny_vae, the session's pipe / tae_pipe, no_network, data_dir)."""
import os
from pathlib import Path

import pytest
import torch

from memflow_nb.text_encoder import T5Config
from memflow_nb.weights import REPOS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

DATA = Path(__file__).parent / "data"
WAN, MF = REPOS[0].folder, REPOS[1].folder  # the hub folders, as load(local_dir=...) expects them
TARGETS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]  # LoRA'd
TINY_T5 = T5Config(vocab=259, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def make_tiny_model(seed: int = 0, **overrides):
    """A random-weight tiny DiT (recipe weights), eval mode, float32, CPU."""
    import dataclasses

    from memflow_nb.engine.config import ModelConfig
    from memflow_nb.engine.model import CausalWanModel
    from memflow_nb.weights import random_module

    cfg = dataclasses.replace(ModelConfig.from_name("tiny"), **overrides)
    return random_module(lambda: CausalWanModel(cfg), seed)


@pytest.fixture
def tiny_model():
    return make_tiny_model()


def make_tiny_vae(seed: int = 0):
    """A narrow random-weight Wan VAE decoder (same architecture, width 8), float32, CPU."""
    from memflow_nb.decode import VAEConfig, WanVAEDecoder
    from memflow_nb.weights import random_module

    return random_module(lambda: WanVAEDecoder(VAEConfig(dim=8)), seed)


@pytest.fixture
def tiny_vae():
    return make_tiny_vae()


def tiny_prompt(seed, text_dim=32, length=7):
    """Random prompt embeddings [1, 512, text_dim], zero past `length` tokens (like a padded prompt)."""
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(1, 512, text_dim, generator=g)
    pe[:, length:] = 0
    return pe


def stream_states(model, n_chunks, stream=None, hw=(64, 64), seed=3, prompt_seed=0, observers=()):
    """Step a fresh stream n_chunks times: ([state 0, state after chunk 0, ...], [x0 of each chunk])."""
    from memflow_nb.engine.config import StreamConfig
    from memflow_nb.engine.steps import init_state, step

    stream = StreamConfig() if stream is None else stream
    state = init_state(model, stream, tiny_prompt(prompt_seed, model.cfg.text_dim), height=hw[0], width=hw[1], seed=seed)
    states, outs = [state], []
    for _ in range(n_chunks):
        state, x0 = step(model, state, observers=observers)
        states.append(state)
        outs.append(x0)
    return states, outs


@pytest.fixture(scope="session")
def pipe():
    """The tiny random-weight pipeline (float32, CPU), shared: generation never changes it."""
    from memflow_nb.pipeline import load

    return load("tiny")


def make_tiny_tae(seed: int = 0):
    """A narrow random-weight TAE decoder (the taew2_1 architecture at width 8), float32, CPU."""
    from memflow_nb.decode.tae import TAEConfig, TAEDecoder
    from memflow_nb.weights import random_module

    return random_module(lambda: TAEDecoder(TAEConfig(channels=(8, 8, 8, 8))), seed)


@pytest.fixture(scope="session")
def tae_pipe(pipe):
    """The tiny pipeline decoding with a narrow random TAE: the same stream, much faster to decode."""
    import dataclasses

    return dataclasses.replace(pipe, vae=make_tiny_tae())


def run_in_chunks(chunk_fn, state, x, sizes):
    """Feed ``x`` [B, T, ...] to ``chunk_fn(piece, state) -> (out, state)`` in pieces of ``sizes``
    frames; returns (the outputs joined along T, each output's frame count, the last state)."""
    assert sum(sizes) == x.shape[1]
    outs, start = [], 0
    for n in sizes:
        out, state = chunk_fn(x[:, start:start + n], state)
        outs.append(out)
        start += n
    return torch.cat(outs, dim=1), [o.shape[1] for o in outs], state


def chunk_timeline(*prompts, chunks_each: int = 3, **settings):
    """A chunk-unit Timeline: one single-prompt segment of `chunks_each` chunks per prompt."""
    from memflow_nb.timeline.model import Timeline

    segs = [{"start": i * chunks_each, "end": (i + 1) * chunks_each, "prompts": [{"text": p}]}
            for i, p in enumerate(prompts)]
    return Timeline(segments=segs, unit="chunks", **settings)


@pytest.fixture
def no_network(monkeypatch):
    """Any hub download fails the test."""
    def refuse(*a, **k):
        raise AssertionError("no download may happen here")
    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)


# -- comparing states, and the dense oracle of a cached stream ---------------------------------------

def same(a, b):
    """Bitwise equality that treats NaN (unscored bank slots) as equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else (a == b)).all())


def tensors_of(state):
    """Every tensor a State holds (to check that nothing wrote into it)."""
    ts = [state.prompt_embeds, state.text_kv, state.history, state.bank_frames, state.bank_scores]
    ts += [t for _, t in state.cache] + list(state.bank) + ([state.pending] if state.pending is not None else [])
    return ts


def masked_reference_chunk(model, states, outs, c, stream):
    """Chunk c recomputed without any cache: one pass over [clean frames 0..s-1 | noisy chunk c],
    each query frame attending (by an additive log-multiplicity mask) to exactly the frames it saw
    when it was generated: sink, the bank as it was then (per layer), and its local window."""
    n, sink, local = stream.chunk_frames, stream.sink_size, stream.local_attn_size
    s = c * n
    T = states[0].tokens_per_frame
    L = model.cfg.num_layers
    nf = s + n

    def counts_for(layer):
        cnt = torch.zeros(nf, nf)
        for qf in range(nf):
            cq = qf // n
            e = (cq + 1) * n
            keys = list(range(min(sink, e)))
            bank_state = states[cq + 1]  # bank after chunk cq's refresh
            keys += [f for f in bank_state.bank_frames[layer, 0].tolist() if f >= 0]  # no empty slots
            keys += list(range(max(sink, e - (local - sink)), e))
            for kf in keys:
                cnt[qf, kf] += 1
        return cnt

    biases = []
    for layer in range(L):
        cnt = counts_for(layer).repeat_interleave(T, 0).repeat_interleave(T, 1)
        biases.append(torch.where(cnt > 0, cnt.log(), torch.tensor(float("-inf"))))

    def attend(layer, q, k, v, need_output):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=biases[layer]).transpose(1, 2)

    from memflow_nb.engine.noise import chunk_noise
    from memflow_nb.engine.schedule import add_noise, denoising_schedule, flow_to_x0

    steps = denoising_schedule(stream)
    shape = outs[c].shape
    drawn = chunk_noise(states[0].seed, c, shape, len(steps))
    clean = torch.cat(outs[:c], dim=1) if c else outs[0][:, :0]
    x = drawn[0]
    text_kv = states[c + 1].text_kv
    for i, st in enumerate(steps):
        seq = torch.cat([clean, x], dim=1)
        t = torch.cat([torch.full((1, s), float(stream.context_noise)), torch.full((1, n), st.timestep)], dim=1)
        flow = model(seq, t, text_kv, 0, attend)[:, s:]
        x0 = flow_to_x0(x, flow, st.sigma)
        if i + 1 < len(steps):
            x = add_noise(x0, drawn[i + 1], steps[i + 1].sigma)
    return x0


# -- files with the real names and layout, tiny shapes -----------------------------------------------

def tiny_dit_weights(seed=3) -> dict:
    """Recipe weights of the tiny DiT, by Wan name."""
    from memflow_nb.engine.config import ModelConfig
    from memflow_nb.engine.model import CausalWanModel
    from memflow_nb.weights import meta_shapes, recipe_weights

    return recipe_weights(meta_shapes(lambda: CausalWanModel(ModelConfig.from_name("tiny"))), seed)


def tiny_lora(cfg=None, rank=4, seed=4) -> dict:
    """PEFT-named LoRA weights for every MemFlow target of a DiT config (default: tiny)."""
    from memflow_nb.engine.config import ModelConfig

    cfg = ModelConfig.from_name("tiny") if cfg is None else cfg
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(cfg.num_layers):
        for t in TARGETS:
            d_in = cfg.ffn_dim if t == "ffn.2" else cfg.dim
            d_out = cfg.ffn_dim if t == "ffn.0" else cfg.dim
            key = f"base_model.model.blocks.{i}.{t}"
            out[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * 0.1
            out[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.1
    return out


def vaemeta_shapes(dim: int) -> dict:
    """The full 194-tensor Wan2.1_VAE.pth layout (encoder included) at width `dim` instead of 96."""
    import json

    full = json.loads((DATA / "recipe_keys.json").read_text())["vae"]
    # Channel counts are multiples of 96; the other sizes (RGB 3, z 16 / 32, kernels) are not.
    return {k: tuple(s // 96 * dim if s % 96 == 0 else s for s in v) for k, v in full.items()}


def write_hub_layout(root: Path, *, base=None, lora=None) -> dict:
    """<root>/Wan2.1-T2V-1.3B/... and <root>/MemFlow/... with tiny weights and the real names."""
    from memflow_nb.pipeline import tiny_tokenizer
    from memflow_nb.text_encoder import UMT5Encoder
    from memflow_nb.weights import meta_shapes, recipe_weights

    base = tiny_dit_weights() if base is None else base
    lora = tiny_lora() if lora is None else lora
    (root / MF).mkdir(parents=True, exist_ok=True)
    tok_dir = root / WAN / "google" / "umt5-xxl"
    tok_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": {"model." + k: v for k, v in base.items()}, "step": 100}, root / MF / "base.pt")
    torch.save({"generator_lora": lora, "step": 100}, root / MF / "lora.pt")
    t5 = {k: v.to(torch.bfloat16) for k, v in recipe_weights(meta_shapes(lambda: UMT5Encoder(TINY_T5)), 5).items()}
    torch.save(t5, root / WAN / "models_t5_umt5-xxl-enc-bf16.pth")
    vae = recipe_weights(vaemeta_shapes(8), 6)
    torch.save(vae, root / WAN / "Wan2.1_VAE.pth")
    tiny_tokenizer().save(str(tok_dir / "tokenizer.json"))
    return {"base": base, "lora": lora, "t5": t5, "vae": vae}
