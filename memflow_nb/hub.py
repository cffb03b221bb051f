"""Getting MemFlow's weights and assembling a ready pipeline.

    pipe = load()                                  # downloads what is missing, then loads
    pipe = load(local_dir="/data/memflow")         # a local copy, no network if complete
    pipe = load("tiny", device="cpu")              # random weights, no files: output is noise

Files come from two Hugging Face repos (see `REPOS`); only the five files MemFlow needs are
fetched, with `huggingface_hub.snapshot_download(allow_patterns=...)`. With `local_dir` the
layout is `<local_dir>/Wan2.1-T2V-1.3B/...` and `<local_dir>/MemFlow/...` (docs/weights.md).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .engine.checks import stream_bytes
from .engine.config import ModelConfig, StreamConfig, latent_size
from .engine.model import CausalWanModel
from .io import WeightsNotFound, load_dit, load_vae
from .lora_stack import add_loras
from .precision import DtypeLike, resolve_dtype
from .text_encoder import PromptEncoder, T5Config, Tokenizer, UMT5Encoder
from .text_loading import TextEncoderPlacement, load_prompt_encoder
from .vae import VAEConfig, WanVAEDecoder

__all__ = ["RepoFiles", "REPOS", "WeightPaths", "fetch_weights", "hf_download_command", "Pipeline", "load",
           "tiny_tokenizer"]


@dataclass(frozen=True)
class RepoFiles:
    """What MemFlow needs from one hub repo: patterns to fetch and the files it then reads."""

    repo_id: str
    folder: str  # its folder under local_dir
    patterns: tuple[str, ...]  # allow_patterns for snapshot_download
    required: tuple[str, ...]  # files that must exist afterwards


REPOS = (
    RepoFiles("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B",
              ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*"),
              ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json")),
    RepoFiles("KlingTeam/MemFlow", "MemFlow", ("base.pt", "lora.pt"), ("base.pt", "lora.pt")),
)


@dataclass(frozen=True)
class WeightPaths:
    """Where each file MemFlow reads lies on disk."""

    base: Path
    lora: Path
    text_encoder: Path
    tokenizer_dir: Path
    vae: Path


def hf_download_command(repo: RepoFiles, patterns, revision: str | None = None, local_dir=None) -> str:
    """The `hf download` command line that fetches `patterns` of `repo`."""
    cmd = f"hf download {repo.repo_id}" + "".join(f' --include "{p}"' for p in patterns)
    if revision:
        cmd += f" --revision {revision}"
    if local_dir is not None:
        cmd += f' --local-dir "{Path(local_dir) / repo.folder}"'
    return cmd


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; also honour a value set later.
    import huggingface_hub
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or huggingface_hub.is_offline_mode()


def _revision_of(revision, repo: RepoFiles) -> str | None:
    if not isinstance(revision, dict):
        return revision
    known = {r.repo_id for r in REPOS} | {r.folder for r in REPOS}
    stray = sorted(set(revision) - known)
    if stray:
        raise ValueError(f"revision has keys {stray}; use the repo ids {[r.repo_id for r in REPOS]}")
    return revision.get(repo.repo_id, revision.get(repo.folder))


def _pattern_of(repo: RepoFiles, required: str) -> str:
    return next(p for p in repo.patterns if p == required or (p.endswith("/*") and required.startswith(p[:-1])))


def fetch_weights(local_dir: str | os.PathLike | None = None, revision: str | dict | None = None, *,
                  progress: bool = True, skip: tuple[str, ...] = ()) -> WeightPaths:
    """Find MemFlow's files, downloading only what is missing, and return their paths.

    local_dir: a folder holding `Wan2.1-T2V-1.3B/` and `MemFlow/` (see docs/weights.md); complete
        copies are used without touching the network, missing files are downloaded into it.
        None: the Hugging Face cache (HF_HOME / HF_HUB_CACHE).
    revision: a commit / tag / branch for both repos, or {repo_id: revision}.
    Offline (HF_HUB_OFFLINE=1) or when a download fails, raises one WeightsNotFound that lists
    every missing file and the `hf download` commands that fetch them.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    offline, folders, problems = _offline(), {}, []
    # skip: files the caller has from elsewhere (e.g. the text encoder as an fp8 file).
    repos = [RepoFiles(r.repo_id, r.folder, tuple(p for p in r.patterns if p not in skip),
                       tuple(f for f in r.required if f not in skip)) for r in REPOS]
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        for repo in repos:
            rev = _revision_of(revision, repo)
            folder = Path(local_dir) / repo.folder if local_dir is not None else None
            reason = None
            if folder is None or _missing(folder, repo):
                if offline and folder is not None:
                    reason = "offline (HF_HUB_OFFLINE is set), so nothing was downloaded"
                else:
                    try:
                        folder = Path(snapshot_download(repo.repo_id, allow_patterns=list(repo.patterns),
                                                        revision=rev, local_dir=folder, local_files_only=offline))
                    except Exception as e:  # reported below, with every other missing file
                        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        if offline:
                            reason = "offline (HF_HUB_OFFLINE is set) and not in the hub cache"
            missing = list(repo.required) if folder is None else _missing(folder, repo)
            if missing:
                problems.append((repo, rev, folder, missing, reason or "the download did not provide them"))
            folders[repo.repo_id] = folder
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    if problems:
        raise WeightsNotFound(_missing_message(problems, local_dir))
    wan, mf = (folders[r.repo_id] for r in REPOS)
    return WeightPaths(base=mf / "base.pt", lora=mf / "lora.pt", text_encoder=wan / "models_t5_umt5-xxl-enc-bf16.pth",
                       tokenizer_dir=wan / "google" / "umt5-xxl", vae=wan / "Wan2.1_VAE.pth")


def _missing(folder: Path, repo: RepoFiles) -> list[str]:
    return [f for f in repo.required if not (folder / f).is_file()]


def _missing_message(problems, local_dir) -> str:
    n = sum(len(m) for *_, m, _ in problems)
    where = f"in {local_dir}" if local_dir is not None else "in the Hugging Face cache"
    lines = [f"MemFlow needs {n} file(s) that are not {where}:"]
    for repo, rev, folder, missing, reason in problems:
        base = folder if folder is not None else repo.repo_id
        lines += [f"  {base}/{f}" for f in missing] + [f"    ({repo.repo_id}: {reason})"]
    lines.append("Get them with (then call load again" + (", with local_dir" if local_dir is not None else "") + "):")
    for repo, rev, folder, missing, reason in problems:
        patterns = list(dict.fromkeys(_pattern_of(repo, f) for f in missing))
        lines.append("  " + hf_download_command(repo, patterns, rev, local_dir))
    return "\n".join(lines)


# --------------------------------------------------------------------------------- pipeline

@dataclass(repr=False)
class Pipeline:
    """Everything a stream needs: the DiT, the prompt encoder, the VAE decoder and the settings.

    model: CausalWanModel (`memflow_nb.init_state` / `step` take it).
    text: PromptEncoder; `text(["a prompt"])` -> [B, 512, text_dim] on `device`.
    vae: WanVAEDecoder for `memflow_nb.vae.decode_chunk`.
    The "tiny" pipeline has random weights: it exercises every code path but makes noise, not pictures.
    """

    model: CausalWanModel
    text: PromptEncoder
    vae: WanVAEDecoder
    stream: StreamConfig = field(default_factory=StreamConfig)
    name: str = "memflow"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def random_weights(self) -> bool:
        return self.name == "tiny"

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) used when neither the call nor the timeline gives one: MemFlow's
        training size 480x832, or a small 64x112 for the tiny model (noise needs no pixels)."""
        return (64, 112) if self.random_weights else (480, 832)

    def __repr__(self) -> str:
        c = self.model.cfg
        params = sum(p.numel() for p in self.model.parameters())
        note = ", RANDOM WEIGHTS: output is noise, not pictures" if self.random_weights else ""
        return (f"Pipeline(name={self.name!r}, device={self.device}, dtype={self.dtype}, "
                f"dit=dim {c.dim} x {c.num_layers} layers ({params / 1e6:.1f}M params){note})")


def load(name: str = "memflow", *, local_dir: str | os.PathLike | None = None, revision: str | dict | None = None,
         device: str | torch.device | None = None, dtype: DtypeLike = "auto",
         text_encoder: str | os.PathLike | None = None, text_encoder_mode: str | TextEncoderPlacement = "auto",
         text_encoder_device: str | torch.device | None = None, text_encoder_dtype: DtypeLike = "auto",
         merged_cache_dir: str | os.PathLike | None = None, progress: bool = True, seed: int = 0,
         loras=()) -> Pipeline:
    """Load a ready pipeline.

    name: "memflow" (MemFlow on Wan2.1-T2V-1.3B: 1.3B DiT with the LoRA merged, umT5-XXL, Wan VAE)
        or "tiny" (random weights, no files, no network, runs on a CPU in seconds; noise only).
    local_dir, revision: where the files are / which hub revision, see `fetch_weights`.
    device: for the DiT and the VAE (default "cuda" when available).
    dtype: theirs; "auto" (the default) is bf16 on CUDA capability >= 8.0, fp16 below (a T4),
        float32 on the CPU (see `memflow_nb.precision.choose_dtype`). An explicit dtype wins.
    text_encoder: another umT5 file instead of Wan's bf16 `.pth` (which is then not downloaded),
        e.g. Kijai's `umt5-xxl-enc-fp8_e4m3fn.safetensors` (6.7 GB; see memflow_nb.text_loading).
    text_encoder_mode: "auto" (on a GPU: kept there when it fits, else streamed block by block
        from the file; on a CPU: streamed unless a float32 copy fits), "gpu", "streamed", "cpu",
        or a TextEncoderPlacement. text_encoder_device (default `device`) / _dtype ("auto": bf16
        on CUDA >= 8.0, float32 elsewhere): where and in what it computes. Embeddings go to `device`.
    merged_cache_dir: keep the LoRA-merged DiT there so the next load skips the merge.
    seed: weight seed of the "tiny" pipeline (ignored otherwise).
    loras: user LoRAs [(path.safetensors, scale), ...], merged on top of MemFlow's own; their scales
        can change later (memflow_nb.lora_stack.set_lora_scale / remove_lora).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    if name == "tiny":
        pipe = _tiny(seed, device, dtype)
        add_loras(pipe.model, loras)
        return pipe
    if name != "memflow":
        raise ValueError(f"unknown pipeline {name!r}; known: 'memflow', 'tiny'")
    paths = fetch_weights(local_dir, revision, progress=progress,
                          skip=("models_t5_umt5-xxl-enc-bf16.pth",) if text_encoder is not None else ())
    from tqdm.auto import tqdm

    with tqdm(total=3, desc="loading MemFlow", disable=not progress) as bar:
        bar.set_postfix_str("DiT + LoRA")
        model = load_dit(paths.base, paths.lora, device=device, dtype=dtype, cache_dir=merged_cache_dir,
                         progress=progress)
        add_loras(model, loras)
        bar.update()
        bar.set_postfix_str("text encoder")
        # "auto" keeps it on the GPU only if a 480x832 stream still fits beside it (the DiT is loaded).
        reserve = stream_bytes(model.cfg, StreamConfig(), latent_size(480, 832), elem=dtype.itemsize)
        text = load_prompt_encoder(text_encoder or paths.text_encoder, paths.tokenizer_dir, text_encoder_mode,
                                   device=text_encoder_device or (None if text_encoder_mode == "cpu" else device),
                                   dtype=text_encoder_dtype,
                                   reserve_bytes=reserve, output_device=device)
        bar.update()
        bar.set_postfix_str("VAE")
        vae = load_vae(paths.vae, device=device, dtype=dtype)
        bar.update()
    return Pipeline(model, text, vae, StreamConfig(), "memflow", device, dtype)


# ------------------------------------------------------------------------------------- tiny

TINY_T5 = dict(dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)
TINY_VAE = VAEConfig(dim=8)


def tiny_tokenizer():
    """A byte-level `tokenizers.Tokenizer` made in memory: `<pad>`=0, `</s>`=1, `<unk>`=2, then the
    256 byte symbols in a fixed order (259 tokens). Every text encodes, one token per UTF-8 byte."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def _random_module(build, seed: int, device, dtype):
    from .testing import recipe_weights

    with torch.device("meta"):
        module = build()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sd = {k: v.to(device=device, dtype=dtype) for k, v in recipe_weights(shapes, seed).items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _tiny(seed: int, device: torch.device, dtype: torch.dtype) -> Pipeline:
    # Tokenizer only reads files, so the in-memory one takes a trip through a temporary folder.
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer().save(str(Path(tmp) / "tokenizer.json"))
        tokenizer = Tokenizer(tmp)
    cfg = ModelConfig.from_name("tiny")
    t5 = T5Config(vocab=tokenizer.vocab_size, dim=cfg.text_dim, **TINY_T5)
    model = _random_module(lambda: CausalWanModel(cfg), seed, device, dtype)
    encoder = _random_module(lambda: UMT5Encoder(t5), seed + 1, device, dtype)
    vae = _random_module(lambda: WanVAEDecoder(TINY_VAE), seed + 2, device, dtype)
    text = PromptEncoder(encoder, tokenizer, device=device, keep_on_cpu=True)
    return Pipeline(model, text, vae, StreamConfig(), "tiny", device, dtype)
