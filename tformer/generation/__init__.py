"""Generation: continue a prompt (decoder), translate it (encoder-decoder), fill in <mask> tokens (encoder).

- `config`: `GenerateConfig`, the options and their defaults;
- `sampling`: logits -> the next token (`Sampler`);
- `engine`: prefill and decode steps over the static KV cache, and the decoding loop;
- `recompute`: the same loop without a cache, recomputing the window every step (the oracle);
- `stream`: each row's text in whole characters, stop strings;
- `beam`: beam search; `fill_mask`: masked-LM candidates; `prompts`: reading and preparing prompts;
- `load`: a checkpoint ready to generate from; `cpu_decoding`: the CPU weight layout for batch-1 decoding.
"""

from tformer.generation.beam import beam_search
from tformer.generation.config import GenerateConfig
from tformer.generation.fill_mask import fill_mask
from tformer.generation.generate import generate, sample_continuation
from tformer.generation.load import Loaded, load
from tformer.generation.prompts import read_prompts
from tformer.generation.results import (
           Candidate,
           Completion,
           FillMaskResult,
           GenerateResult,
           Timings,
)

__all__ = ["Candidate", "Completion", "FillMaskResult", "GenerateConfig", "GenerateResult", "Loaded", "Timings",
           "beam_search", "fill_mask", "generate", "load", "read_prompts", "sample_continuation"]
