"""Prompt conditioning per chunk: blending weighted prompts, transitions between blends, and the
plan that turns a timeline into one embedding per chunk (each distinct text encoded once).

Blending: weights are normalised; a linear blend is rescaled per token to the weighted mean of the
input norms; slerp (exactly two prompts) interpolates each token vector on the sphere, falling back
to lerp for tiny angles and for zero vectors (T5 padding rows). Transitions: see
`memflow_nb.timeline.model` (Scope's semantics: N embeddings at t = linspace(0, 1, N), one per chunk).

The plan is symbolic (texts, weights, transition steps): whether a chunk switches the prompt is
decided here, once, by comparing plan entries; embeddings are computed only for the chunks made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import torch

from .clock import CHUNK_FRAMES
from .model import Method, Segment, Timeline

_EPS = 1e-8  # norms below this are treated as zero vectors (T5 padding tokens are exact zeros)
_ANGLE_EPS = 1e-4  # slerp falls back to lerp below this angle (and for near-opposite vectors)


# ----------------------------------------------------------------------------------------------
# Blending and transition math
# ----------------------------------------------------------------------------------------------

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision T5 embeddings are blended in float32; float64 inputs stay float64.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _normalised_weights(weights: Any, n: int) -> list[float]:
    w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} embeddings")
    total = math.fsum(w)
    if any(not math.isfinite(x) or x < 0 for x in w) or not (0 < total < math.inf):
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
    return [x / total for x in w]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per token vector: ``a, b [..., D]`` -> ``[..., D]`` at ``t`` in [0, 1].

    The angle comes from the normalised vectors; the unnormalised inputs are combined with the
    sin-ratio weights, so norms interpolate too. Tokens whose angle is < 1e-4 (or within 1e-4 of
    pi, or with a zero vector) use plain lerp, where slerp is numerically undefined.
    ``t = 0`` and ``t = 1`` return exact copies of ``a`` and ``b``.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    cd = _compute_dtype(a)
    x, y = a.to(cd), b.to(cd)
    nx, ny = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
    cos = ((x * y).sum(-1, keepdim=True) / (nx * ny).clamp_min(_EPS)).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    flat = (sin < _ANGLE_EPS) | (nx < _EPS) | (ny < _EPS)  # sin < eps covers both 0 and pi
    safe = torch.where(flat, torch.ones_like(sin), sin)
    arc = (torch.sin((1 - t) * omega) / safe) * x + (torch.sin(t * omega) / safe) * y
    out = torch.where(flat, torch.lerp(x, y, t), arc)
    return out.to(a.dtype)


def _interp(a: torch.Tensor, b: torch.Tensor, t: float, method: str) -> torch.Tensor:
    if method == "slerp":
        return slerp(a, b, t)
    if method != "linear":
        raise ValueError(f"unknown interpolation method {method!r}; use 'linear' or 'slerp'")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    cd = _compute_dtype(a)
    return torch.lerp(a.to(cd), b.to(cd), t).to(a.dtype)


def blend_prompts(embeds: torch.Tensor, weights: Any, method: Method = "linear") -> torch.Tensor:
    """Blend ``embeds [N, L, D]`` with ``weights [N]`` (>= 0, normalised to sum 1) -> ``[L, D]``.

    linear: weighted sum, rescaled per token to the weighted mean of the input norms (a plain
    weighted sum of differing directions would shrink). slerp: only for exactly two prompts,
    ``slerp(e0, e1, w1)``; with more prompts it falls back to linear. A single prompt is returned as is.
    """
    if embeds.ndim != 3:
        raise ValueError(f"embeds must be [N, L, D], got shape {tuple(embeds.shape)}")
    w = _normalised_weights(weights, embeds.shape[0])
    if len(w) == 1:
        return embeds[0].clone()
    if method == "slerp" and len(w) == 2:
        return slerp(embeds[0], embeds[1], w[1])
    if method not in ("linear", "slerp"):
        raise ValueError(f"unknown blend method {method!r}; use 'linear' or 'slerp'")
    cd = _compute_dtype(embeds)
    x = embeds.to(cd)
    wt = torch.tensor(w, dtype=cd, device=x.device)
    mixed = torch.einsum("n,nld->ld", wt, x)
    target = torch.einsum("n,nl->l", wt, x.norm(dim=-1))
    norm = mixed.norm(dim=-1)
    # Tokens that cancel out (or are zero padding) are left unscaled rather than blown up.
    scale = torch.where(norm > _EPS, target / norm.clamp_min(_EPS), torch.ones_like(norm))
    return (mixed * scale.unsqueeze(-1)).to(embeds.dtype)


def _transition_ts(steps: int) -> list[float]:
    # linspace(0, 1, steps) as Python floats, shared by transition_schedule and the plan.
    return [0.0] if steps == 1 else [j / (steps - 1) for j in range(steps)]


def transition_schedule(src: torch.Tensor, dst: torch.Tensor, steps: int, method: Method = "slerp") -> torch.Tensor:
    """``steps`` embeddings from ``src [L, D]`` to ``dst [L, D]`` at ``t = linspace(0, 1, steps)``
    -> ``[steps, L, D]``; row 0 equals ``src``, the last row equals ``dst`` when ``steps >= 2``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.stack([_interp(src, dst, t, method) for t in _transition_ts(steps)])


# ----------------------------------------------------------------------------------------------
# Per-chunk conditioning plan
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Blend:
    """A segment's prompt blend: texts with normalised weights, blended with ``method``."""

    texts: tuple[str, ...]
    weights: tuple[float, ...]
    method: str = "linear"

    @classmethod
    def of(cls, segment: Segment, method: str = "linear") -> "Blend":
        total = math.fsum(p.weight for p in segment.prompts)
        return cls(tuple(p.text for p in segment.prompts), tuple(p.weight / total for p in segment.prompts), method)


@dataclass(frozen=True)
class Transition:
    """Step ``step`` of ``steps`` from ``source`` (whatever the previous chunk used) to ``target``."""

    source: Union[Blend, "Transition"]
    target: Blend
    step: int
    steps: int
    method: str

    @property
    def t(self) -> float:
        return _transition_ts(self.steps)[self.step]


Conditioning = Union[Blend, Transition]


def _needed(c: Conditioning) -> list[str]:
    return list(c.texts) if isinstance(c, Blend) else _needed(c.source) + list(c.target.texts)


@dataclass(frozen=True)
class ChunkConditioning:
    """What one chunk is conditioned on.

    ``changed`` is True when the conditioning differs from the previous chunk's (and at chunk 0):
    the points where generate() must refresh the text cross-attention and re-cache the KV window.
    """

    chunk: int
    segment: int
    conditioning: Conditioning
    changed: bool

    @property
    def texts(self) -> tuple[str, ...]:
        """Distinct prompt texts this chunk needs (a transition also needs its source's)."""
        return tuple(dict.fromkeys(_needed(self.conditioning)))

    @property
    def weights(self) -> dict[str, float]:
        """Normalised weight per text of the blend being shown or transitioned to."""
        blend = self.conditioning if isinstance(self.conditioning, Blend) else self.conditioning.target
        out: dict[str, float] = {}
        for text, w in zip(blend.texts, blend.weights):
            out[text] = out.get(text, 0.0) + w
        return out

    @property
    def t(self) -> float | None:
        """Transition position in (0, 1) when inside a transition, else None."""
        return self.conditioning.t if isinstance(self.conditioning, Transition) else None


def conditioning_plan(timeline: Timeline, blend_method: Method = "linear",
                      chunk_frames: int = CHUNK_FRAMES) -> list[ChunkConditioning]:
    """One ``ChunkConditioning`` per chunk of ``timeline`` (length ``num_chunks``).

    Transition steps at t = 0 and t = 1 are written as their source / target, so ``changed`` is
    exact: identical consecutive prompts, or a transition's first step, cause no switch event.
    A transition into a blend equal to the current one is skipped; one cut short by the next
    segment is used, mid-way, as that segment's source.
    """
    if blend_method not in ("linear", "slerp"):
        raise ValueError(f"unknown blend method {blend_method!r}; use 'linear' or 'slerp'")
    plan: list[ChunkConditioning] = []
    prev: Conditioning | None = None
    prev_segment, source, first = -1, None, 0
    for k, i in enumerate(timeline.chunk_plan(chunk_frames)):
        seg = timeline.segments[i]
        target = Blend.of(seg, blend_method)
        steps = seg.transition_steps or 0
        if i != prev_segment:
            source = prev if (prev is not None and steps > 0 and prev != target) else None
            first, prev_segment = k, i
        j = k - first
        if source is None or j >= steps:
            cond: Conditioning = target
        else:
            t = _transition_ts(steps)[j]
            cond = source if t == 0.0 else target if t == 1.0 else \
                Transition(source, target, j, steps, seg.transition_method or "slerp")
        plan.append(ChunkConditioning(k, i, cond, prev is None or cond != prev))
        prev = cond
    return plan


def unique_texts(timeline: Timeline) -> list[str]:
    """Distinct prompt texts of ``timeline`` in order of first appearance (encode each once)."""
    return list(dict.fromkeys(p.text for seg in timeline.segments for p in seg.prompts))


class Embeddings:
    """Embedding of each `Conditioning`: ``embeddings(c)`` -> ``[L, D]``.

    ``embed_of(text)`` returns ``[L, D]`` or ``[1, L, D]`` and is called once per distinct text, lazily,
    so only the texts of the conditionings asked for are encoded. Blends are cached; a transition's
    rows are computed one chunk at a time (equal to the rows of ``transition_schedule``), so long
    transitions cost no extra memory.
    """

    def __init__(self, embed_of: Callable[[str], torch.Tensor]):
        self._embed_of = embed_of
        self._texts: dict[str, torch.Tensor] = {}
        self._blends: dict[Blend, torch.Tensor] = {}
        self._sources: dict[Conditioning, torch.Tensor] = {}  # the source of the transition in progress

    def text(self, s: str) -> torch.Tensor:
        if s not in self._texts:
            e = self._embed_of(s)
            e = e[0] if e.ndim == 3 and e.shape[0] == 1 else e
            if e.ndim != 2:
                raise ValueError(f"embed_of({s[:40]!r}) returned shape {tuple(e.shape)}; expected [L, D] or [1, L, D]")
            if self._texts and e.shape != next(iter(self._texts.values())).shape:
                raise ValueError(f"embed_of returned inconsistent shapes: {tuple(e.shape)}")
            self._texts[s] = e
        return self._texts[s]

    def __call__(self, c: Conditioning) -> torch.Tensor:
        if isinstance(c, Blend):
            if c not in self._blends:
                self._blends[c] = blend_prompts(torch.stack([self.text(s) for s in c.texts]), c.weights, c.method)
            return self._blends[c]
        if c.source not in self._sources:
            self._sources.clear()
            self._sources[c.source] = self(c.source)
        return _interp(self._sources[c.source], self(c.target), c.t, c.method)


def chunk_embeddings(timeline: Timeline, embed_of: Callable[[str], torch.Tensor],
                     blend_method: Method = "linear", chunk_frames: int = CHUNK_FRAMES,
                     start: int = 0) -> Iterator[tuple[int, torch.Tensor, bool]]:
    """Yield ``(chunk, embeds [1, L, D], changed)`` for every chunk from ``start``, following
    ``conditioning_plan``; texts only chunks before ``start`` use are never encoded (see `Embeddings`)."""
    embeddings = Embeddings(embed_of)
    for cc in conditioning_plan(timeline, blend_method, chunk_frames)[start:]:
        yield cc.chunk, embeddings(cc.conditioning).unsqueeze(0), cc.changed


def switch_summary(timeline: Timeline, num_chunks: int | None = None, chunk_frames: int = CHUNK_FRAMES) -> str:
    """Two different things, in one line: "segments start at chunks [11, 22, 33]; conditioning changes
    at chunks [12, 13, 14, 23, 24, 34, 35, 36]" (the lighthouse example).

    *Segment starts*: the chunk where each later segment that plays begins (`Timeline.effective_switches`).
    *Conditioning changes*: the chunks whose text conditioning differs from the previous chunk's (where
    the KV cache is re-made). They differ for transitions: a segment with ``transition_steps = N >= 1``
    starting at chunk ``s`` keeps the previous conditioning on ``s`` (its t = 0) and changes it on
    ``s + 1`` .. ``s + max(1, N - 1)``. Only chunks before ``num_chunks`` (default: the whole timeline) count.
    """
    plan = timeline.chunk_plan(chunk_frames)
    n = len(plan) if num_chunks is None else num_chunks
    starts = [sw.chunk for sw in timeline.effective_switches(chunk_frames)[1:]
              if sw.chunk < min(n, len(plan)) and plan[sw.chunk] == sw.segment]
    changes = [cc.chunk for cc in conditioning_plan(timeline, chunk_frames=chunk_frames)[1:n] if cc.changed]
    return (f"segments start at chunks {starts or 'none'}; "
            f"conditioning changes at chunks {changes or 'none'}")
