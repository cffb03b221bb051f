"""Fixtures shared by the test modules (helpers live here; no test module imports another)."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

DATA = Path(__file__).parent / "data"


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
