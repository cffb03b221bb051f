"""Matplotlib figures for the memory bank and attention (static, so they work in Colab and CI)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..engine.memory import MemoryEvent, is_outside
from ..recording import AttentionRecording, bank_timeline


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _frame_name(frame: int) -> str:
    """A slot's frame as shown: its number, "-" when empty, "O<k>" for the k-th outside picture."""
    return "-" if frame == -1 else f"O{-2 - frame}" if is_outside(frame) else str(frame)


def _short(label) -> str:
    g, f, slot = label
    return {"sink": f"S{f}", "bank": f"B{slot}:{_frame_name(f)}", "local": f"L{f}", "current": f"C{f}"}[g]


def plot_bank_timeline(events: Sequence[MemoryEvent], layers: Optional[Sequence[int]] = None, batch: int = 0):
    """Which source frame sits in which bank slot after each refresh, one panel per layer.

    x: chunk of the refresh (or intervention); y: slot; colour and number: the source latent
    frame. Outside pictures (memflow_nb.interventions.inject_image) are grey cells "O<k>", named
    in the title; empty slots are blank.
    """
    plt = _plt()
    if not events:
        raise ValueError("the memory log is empty: generate past the first record (chunk 1) first")
    L = events[0].frames_after.shape[0]
    slots = max(e.frames_after.shape[2] for e in events)
    grid = bank_timeline(events, L, slots, batch)  # [n, L, slots]
    layers = list(range(L)) if layers is None else list(layers)
    chunks = [e.chunk for e in events]
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, 0.45 * len(events)), 1.1 + 0.55 * slots * len(layers)),
                             squeeze=False, sharex=True)
    vmax = max(1, int(grid.max()))
    for ax, l in zip(axes[:, 0], layers):
        data = np.ma.masked_less(grid[:, l, :].T.astype(float), 0)
        ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.imshow(np.ma.masked_greater(grid[:, l, :].T.astype(float), -2), aspect="auto", cmap="Greys",
                  vmin=-4, vmax=0, interpolation="nearest")  # outside pictures
        for i in range(len(events)):
            for j in range(slots):
                if grid[i, l, j] >= 0 or is_outside(grid[i, l, j]):
                    ax.text(i, j, _frame_name(int(grid[i, l, j])), ha="center", va="center", fontsize=7, color="w")
        ax.set_yticks(range(slots), [f"slot {j}" for j in range(slots)])
        ax.set_ylabel(f"layer {l}")
    step = max(1, len(chunks) // 20)
    axes[-1, 0].set_xticks(range(0, len(chunks), step), [str(c) for c in chunks[::step]])
    axes[-1, 0].set_xlabel("chunk (bank refresh)")
    outside = dict(o for e in events for o in e.outside)
    names = ", ".join(f"{_frame_name(c)} = {label}" for c, label in sorted(outside.items(), reverse=True))
    fig.suptitle("Memory bank: source latent frame per slot" + (f" (outside: {names})" if names else ""))
    fig.tight_layout()
    return fig


def plot_attention_mass(rec: AttentionRecording, chunk: int, step: int = -1, heads: Optional[Sequence[int]] = None,
                        kind: str = "denoise"):
    """Heatmaps of attention mass (layers x key frames), one panel per head, for one chunk and step.

    Columns are labelled S (sink), B<slot>:<frame> (bank), L (earlier local frames), C (this chunk).
    """
    plt = _plt()
    mass, labels = rec.layer_by_key_frame(chunk, step, kind)  # [L, H, K]
    layers = sorted({s.layer for s in rec.select(chunk=chunk, kind=kind)})
    heads = list(range(mass.shape[1])) if heads is None else list(heads)
    cols = min(4, len(heads))
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.2, max(2.8, (0.3 * len(layers) + 1.6) * rows)),
                             squeeze=False, layout="constrained")
    im = None
    for ax, h in zip(axes.flat, heads):
        im = ax.imshow(mass[:, h].numpy(), aspect="auto", cmap="magma", vmin=0, vmax=float(mass.max()))
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(len(labels)), [_short(x) for x in labels], rotation=90, fontsize=6)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=6)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("layer")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention mass")
    fig.suptitle(f"Self-attention mass per key frame, chunk {chunk}")
    return fig


def plot_retrieval_scores(events: Sequence[MemoryEvent], layer: Optional[int] = None,
                          segments: Optional[Sequence[tuple[int, int, str]]] = None, batch: int = 0):
    """NAM retrieval score of each bank frame at every compression (mean over layers unless `layer`).

    segments: optional (first chunk, end chunk, label) spans of the prompt timeline to shade.
    Compressions right after a prompt switch score against all-zero text keys (official
    behaviour); they are marked with x.
    """
    plt = _plt()
    comp = [e for e in events if e.kind == "compress"]
    if not comp:
        raise ValueError("no compression yet: the bank compresses once it is full (chunk 10 by default)")
    series: dict[int, list[tuple[int, float]]] = {}
    zeroed = []
    for e in comp:
        ls = range(e.scores.shape[0]) if layer is None else [layer]
        per_frame: dict[int, list[float]] = {}
        for l in ls:
            for j, f in enumerate(e.frames_before[l, batch].tolist()):
                per_frame.setdefault(f, []).append(float(e.scores[l, batch, j]))
        for f, vals in per_frame.items():
            series.setdefault(f, []).append((e.chunk, float(np.mean(vals))))
        if e.text_zeroed:
            zeroed.append(e.chunk)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if segments:
        for i, (a, b, label) in enumerate(segments):
            ax.axvspan(a - 0.5, b - 0.5, color=f"C{i % 10}", alpha=0.08)
            ax.text(a, 1.0, label, transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    for f in sorted(series):
        xs, ys = zip(*series[f])
        ax.plot(xs, ys, marker="o", ms=3, lw=1, label=f"frame {_frame_name(f)}")
    for c in zeroed:
        ax.axvline(c, color="k", lw=0.6, ls=":")
        ax.plot([c], [0.0], "kx")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("chunk (compression)")
    ax.set_ylabel("NAM score" + ("" if layer is None else f" (layer {layer})"))
    ax.set_title("Retrieval scores of bank frames against the prompt's text keys")
    if len(series) <= 16:
        ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    return fig
