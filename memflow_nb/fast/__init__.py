"""Speed for a GPU, as values: `pipe = optimize(pipe, "exact")` returns a faster pipeline.

    speed     optimize(pipe), optimize_model(model) -> FastModel (compiled pieces, graphs, kernel order)
    graphs    CUDA-graph replay of whole DiT passes over the engine's Workspace
    fp8       fp8 copies of the blocks' linear layers (fast mode)
    vae       CompiledVAE: the Wan VAE decoder under torch.compile
    settings  the process-wide torch settings of the speed modes, with their inverse
"""
from .speed import FastModel, optimize, optimize_model

__all__ = ["FastModel", "optimize", "optimize_model"]
