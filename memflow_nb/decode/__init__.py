"""Latents to pixels: the `Decoder` protocol, the Wan VAE and the TAE that implement it.

    from memflow_nb.decode import decode_chunk, init_decode_state, to_uint8
    state = init_decode_state(pipe.vae)                       # the Wan VAE, or a TAE
    pixels, state = decode_chunk(pipe.vae, latents, state)    # [B, F, 16, h, w] -> [B, T, 3, H, W]

Loading their weights: `memflow_nb.weights.load_vae` / `load_tae`.
The other way, pixels to latents (pictures put in the memory bank): the Wan VAE encoder,
`memflow_nb.decode.encoder` (`load_vae_encoder`, `encode_chunk`, `encode_video`).
"""
from .protocol import (Decoder, DecodeState, decode_chunk, decode_video, init_decode_state, tensor_bytes,
                       to_uint8)
from .tae import TAEConfig, TAEDecoder, TAEDecodeState
from .vae import VAEConfig, VAEDecodeState, WanVAEDecoder

__all__ = ["Decoder", "DecodeState", "decode_chunk", "decode_video", "init_decode_state", "tensor_bytes",
           "to_uint8", "VAEConfig", "VAEDecodeState", "WanVAEDecoder", "TAEConfig", "TAEDecoder",
           "TAEDecodeState"]
