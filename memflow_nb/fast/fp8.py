"""fp8 (e4m3) linear layers for fast mode: weights stored in fp8 with one scale per output row,
activations quantised per token on the fly, products on the tensor cores via torch._scaled_mm.

A trade of accuracy for speed on Hopper-class GPUs (compute capability >= 8.9): the relative
error of each linear is about 3e-2, against about 4e-3 in bf16. Fast mode only; exact mode never
uses it. The fp8 weights live in copies of the blocks that the fast wrapper holds; the model keeps
its own.
"""
from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
FP8_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
# The per-token linears of each block that fp8 converts (memflow_nb.planning counts the same ones).
FP8_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
               "ffn.0", "ffn.2")


class Float8Linear(nn.Module):
    """Drop-in for nn.Linear (forward only). x [..., in] -> [..., out] in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # [out, 1]
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = x2.shape[0]
        pad = (-m) % 16  # _scaled_mm wants both dims of the left operand divisible by 16
        if pad:
            x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
        sx = (x2.float().abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # [m, 1]
        x8 = (x2.float() / sx).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale, out_dtype=x.dtype)
        if pad:
            y = y[:m]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def fp8_blocks(model, names=FP8_LINEARS) -> list[nn.Module]:
    """Copies of the model's blocks whose per-token linear layers are Float8Linear.

    Every other parameter is the model's own tensor (shared, not copied), and the model itself is
    unchanged. Cross-attention k/v stay in bf16: they run once per prompt, not per chunk.
    """
    p = next(model.parameters())
    # On the CPU the blocks can be converted (to count or store them) but not run: _scaled_mm is CUDA-only.
    if p.device.type == "cuda" and torch.cuda.get_device_capability(p.device) < FP8_CAPABILITY:
        raise RuntimeError("fp8 linears need a GPU of compute capability 8.9 or newer (Ada, Hopper)")
    out = []
    for blk in model.blocks:
        with torch.device("meta"):
            copy = type(blk)(blk.cfg)
        copy.load_state_dict(blk.state_dict(), assign=True)  # the same tensors, no copy
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = copy.get_submodule(parent_name)
            setattr(parent, child, Float8Linear(getattr(parent, child)))
        out.append(copy.eval().requires_grad_(False))
    return out


def to_fp8(model, names=FP8_LINEARS):
    """Store the block linears of `model` in fp8, in place (returns model): the low-memory knob of
    `load(fp8_dit=True)`. The bf16 originals are dropped, saving about 1.25 GB at full size."""
    model.blocks = nn.ModuleList(fp8_blocks(model, names))
    return model
