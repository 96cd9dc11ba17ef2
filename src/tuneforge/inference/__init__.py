"""Fast generation: a static KV cache and CUDA-graph decode steps behind `model.generate`."""

from tuneforge.inference.generate import (
    Decoder,
    disable_fast_generate,
    enable_fast_generate,
    transformers_generate,
)

__all__ = ["Decoder", "disable_fast_generate", "enable_fast_generate", "transformers_generate"]
