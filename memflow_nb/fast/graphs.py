"""CUDA-graph replay of DiT passes: one graph launch per pass instead of thousands of kernel launches.

At small sizes the eager engine is bound by the CPU launching kernels (about 60 ms of launches per
pass against 22 ms of GPU work at 576x320). A captured pass replays with static buffers:
latents, timesteps, RoPE tables, the prompt's text K/V, and the attention workspace buffer
(memflow_nb.engine.context.Workspace), whose fixed frames `prepare` writes once per chunk. Only the two recurring shapes are captured: chunk 0
(no context) and the steady state (sink + full bank + full window); other chunks run eagerly.
The numbers are the eager numbers: replay runs the very kernels that were captured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.context import PassAttention, PassKV, Workspace
from ..engine.model import rope_cos_sin


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    out: torch.Tensor


class PassGraphs:
    """Captured passes of one model, keyed by pass kind and shapes (held by `speed.FastModel`).

    forward: the model's forward, e.g. the wrapper's (with compiled block pieces); backends: the
    SDPA kernel order its attention uses.
    """

    def __init__(self, forward, backends=None):
        self.forward, self.backends = forward, backends
        self.entries: dict[tuple, _Entry] = {}
        self.pool = None
        self.buffer: Optional[torch.Tensor] = None  # one workspace buffer, sized for the largest context
        self.text_kv: Optional[torch.Tensor] = None
        self._text_src = None

    def usable(self, ws: Workspace) -> bool:
        """Graphs serve the workspaces of chunk 0 and of the steady state: the pass's own frames
        are the last chunk_frames key frames, after every cached one, and nothing is masked."""
        sc = ws.state.stream
        steady = ws.n_frames - sc.chunk_frames
        full = sc.sink_size + (sc.bank_size if sc.sink_size > 0 else 0) + sc.prev_frames
        return ws.state.device.type == "cuda" and steady in (0, full) and ws.blocked is None \
            and ws.runs == ((steady, 0, sc.chunk_frames),)

    def prepare(self, ws: Workspace) -> None:
        """Per chunk: the workspace keeps its frames in the shared buffer; the text K/V are copied in."""
        st = ws.state
        cfg = st.model_config
        B, T = st.batch, ws.T
        sc = st.stream
        cap = (sc.sink_size + sc.bank_size + sc.prev_frames + sc.chunk_frames) * T
        shape = (cfg.num_layers, 2, B, cap, cfg.num_heads, cfg.head_dim)
        if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != st.dtype:
            # Captured graphs point into the old buffers: drop them, and their memory pool with them
            # (a pool whose graphs are all gone must not be captured into again).
            self.entries.clear()
            self.pool = None
            self.buffer = None
            torch.cuda.empty_cache()
            self.buffer = torch.empty(shape, device=st.device, dtype=st.dtype)
            self.text_kv = torch.empty_like(st.text_kv)
            self._text_src = None
        ws.use(self.buffer)
        if self._text_src is not st.text_kv:
            self.text_kv.copy_(st.text_kv)
            self._text_src = st.text_kv

    def run(self, ws: Workspace, x: torch.Tensor, t: float, kind: str) -> torch.Tensor:
        """One pass over a prepared workspace. kind "denoise" -> flow [B, f, C, h, w] (read it
        before the next run); "clean" -> this pass's keys/values [L, 2, B, f*T, H, D] (a fresh tensor)."""
        B, f, C, h, w = x.shape
        key = (kind, x.shape, ws.n_frames, ws.runs, x.dtype, ws.sma, ws.n_glob)
        e = self.entries.get(key)
        cfg = ws.state.model_config
        _, ph, pw = cfg.patch_size
        cos, sin = rope_cos_sin(cfg.head_dim, ws.rope_start, f, h // ph, w // pw, x.device)
        if e is None:
            e = self._capture(ws, x, kind, cos, sin)
            self.entries[key] = e
        e.x.copy_(x)
        e.t.fill_(t)
        e.cos.copy_(cos)
        e.sin.copy_(sin)
        e.graph.replay()
        return e.out if kind == "denoise" else e.out.clone()

    def _capture(self, ws: Workspace, x, kind, cos, sin) -> _Entry:
        sx, st = x.clone(), torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)
        scos, ssin = cos.clone(), sin.clone()
        rec = None
        if kind == "clean":  # the clean pass writes its keys/values straight into one static tensor
            L, _, B, _, H, D = self.buffer.shape
            rec = PassKV(L, ws.T, out=self.buffer.new_empty(L, 2, B, x.shape[1] * ws.T, H, D))
        # No observers: a replay runs no Python, so `step` never replays while observers watch.
        attend = PassAttention(ws, kind, -1, backends=self.backends, record=rec)

        def run():
            out = self.forward(sx, st, self.text_kv, ws.rope_start, attend, need_output=kind != "clean",
                               rope=(scos, ssin))
            return rec.kv if kind == "clean" else out

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compiled kernels are built outside the capture
                run()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = run()
        return _Entry(g, sx, st, scos, ssin, out)
