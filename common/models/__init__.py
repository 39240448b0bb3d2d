"""The book's Transformer building blocks (section 4.1), one concept per module.

- :mod:`.attention`   attention core, encoder-decoder multi-head attention, causal self-attention, KV cache
- :mod:`.positional`  sinusoidal encodings, RoPE
- :mod:`.norms`       LayerNorm, RMSNorm
- :mod:`.feedforward` GELU MLP, SwiGLU, ReLU²
- :mod:`.transformer` the encoder-decoder Transformer of "Attention Is All You Need"
- :mod:`.decoder`     the configurable decoder-only LM (:class:`DecoderConfig`, :class:`DecoderLM`)
- :mod:`.generation`  sampling and KV-cache generation
- :mod:`.decode_layout` column-major copies of the matrices for faster decoding, held apart (opt-in)
- :mod:`.hf_llama`    conversion to and from transformers' LlamaForCausalLM
"""

from common.models.decoder import DecoderConfig, DecoderLM

__all__ = ["DecoderConfig", "DecoderLM"]
