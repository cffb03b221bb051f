"""Text-encoder memory and time: streamed vs resident, Wan's bf16 .pth vs the fp8 file, trimmed vs padded.

    python benchmarks/text_encoder.py --dir /tmp/umt5            # umT5-XXL size, random weights
    python benchmarks/text_encoder.py --dir /tmp/umt5 --scale small

Writes two files of random weights with the real names and layouts into --dir (Wan's
`models_t5_umt5-xxl-enc-bf16.pth`, 11.4 GB; Kijai's `umt5-xxl-enc-fp8_e4m3fn.safetensors`,
6.7 GB, made from the same weights), then loads each in each placement and encodes six prompts
of 60-300 tokens in one batch. Prints one line per run: load and encode seconds, peak bytes of
live tensors on the host and the GPU (memflow_nb.live_bytes; the GPU also by the CUDA
allocator), what stays on the GPU afterwards, and whether the numbers agree.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from memflow_nb.pipeline import tiny_tokenizer
from memflow_nb.live_bytes import LiveTensorBytes
from memflow_nb.text_encoder import T5Config, UMT5Encoder
from memflow_nb.weights.text import load_text_encoder, read_text_encoder_file

LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate.0", "ffn.fc1", "ffn.fc2")
PROMPTS = [("a red fox trots through fresh snow in a pine forest at dawn, soft light, slow tracking shot. " * 4)[:n]
           for n in (60, 110, 160, 200, 250, 300)]


def write_files(folder: Path, cfg: T5Config, device: str) -> tuple[Path, Path]:
    """The bf16 .pth and the fp8 safetensors file, from the same random weights."""
    pth, fp8 = folder / "models_t5_umt5-xxl-enc-bf16.pth", folder / "umt5-xxl-enc-fp8_e4m3fn.safetensors"
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    if pth.is_file() and fp8.is_file():
        return pth, fp8
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UMT5Encoder(cfg).state_dict().items()}
    g = torch.Generator(device).manual_seed(0)
    bf16, mixed = {}, {}
    for k in sorted(shapes):
        w = torch.randn(shapes[k], generator=g, device=device)
        w = 1 + 0.1 * w if w.ndim == 1 else w / shapes[k][-1] ** 0.5
        bf16[k] = w.to(torch.bfloat16).cpu()
        linear = k.startswith("blocks.") and any(f".{p}.weight" in k for p in LINEARS)
        mixed[k] = w.to(torch.float8_e4m3fn).cpu() if linear else bf16[k]
    torch.save(bf16, pth)
    save_file(mixed, str(fp8))
    return pth, fp8


def run(path: Path, folder: Path, mode: str, device: str, dtype: torch.dtype, meter: bool):
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    live = LiveTensorBytes() if meter else None
    if live:
        live.__enter__()
    try:
        t0 = time.perf_counter()
        text = load_text_encoder(path, folder, mode, device=device, dtype=dtype)
        t1 = time.perf_counter()
        emb = text.encode_all(PROMPTS)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
    finally:
        if live:
            live.__exit__(None, None, None)
    row = {"file": path.suffix, "mode": mode, "device": device, "dtype": str(dtype).split(".")[-1],
           "load_s": t1 - t0, "encode_s": t2 - t1}
    if live:
        row["host_peak_gb"] = live.peak.get("cpu", 0) / 1e9
        row["gpu_peak_live_gb"] = live.peak.get("cuda", 0) / 1e9
    if cuda:
        row["gpu_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        row["gpu_held_after_gb"] = (torch.cuda.memory_allocated() - base - emb.numel() * emb.element_size()) / 1e9
    return text, emb.cpu(), row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--scale", choices=("full", "small"), default="full")
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = T5Config.from_name("umt5-xxl") if args.scale == "full" else T5Config(
        vocab=4096, dim=256, dim_attn=256, dim_ffn=640, num_heads=4, num_layers=24, num_buckets=32)
    gpu = torch.cuda.is_available()
    t = time.perf_counter()
    pth, fp8 = write_files(folder, cfg, "cuda" if gpu else "cpu")
    info, _ = read_text_encoder_file(pth)
    print(f"files written in {time.perf_counter() - t:.0f} s: {pth.name} {pth.stat().st_size / 1e9:.2f} GB, "
          f"{fp8.name} {fp8.stat().st_size / 1e9:.2f} GB; one block: {info.block_bytes(torch.bfloat16) / 1e9:.3f} GB "
          f"in bf16, {info.block_bytes(torch.float32) / 1e9:.3f} GB in fp32; prompts of "
          f"{[len(p) + 1 for p in PROMPTS]} tokens")
    rows, embs = [], {}
    plan = [(pth, "streamed", "cpu", torch.float32)]
    if gpu:
        plan = [(p, m, "cuda", torch.bfloat16) for p in (pth, fp8) for m in ("streamed", "gpu")] + plan
    for path, mode, device, dtype in plan:
        for meter in (True, False):  # the meter costs Python per op: time without it
            text, emb, row = run(path, folder, mode, device, dtype, meter)
            embs.setdefault((path.suffix, device), []).append(emb)
            if meter:
                rows.append(row)
            else:
                rows[-1]["load_s"], rows[-1]["encode_s"] = row["load_s"], row["encode_s"]
            if mode == "gpu" and not meter:
                ids_padded = time.perf_counter()
                text.trim = False
                text.clear()
                text.encode_all(PROMPTS)
                torch.cuda.synchronize()
                rows[-1]["encode_512_s"] = time.perf_counter() - ids_padded
            del text
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
    for key, es in embs.items():
        print(f"{key}: all runs equal bit for bit: {all(torch.equal(es[0], e) for e in es[1:])}")
    if gpu:
        a, b = embs[(".pth", "cuda")][0].float(), embs[(".safetensors", "cuda")][0].float()
        print(f"fp8 file vs bf16 file (same weights, random): relative L2 {((a - b).norm() / a.norm()).item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
