"""Generation: continue a prompt (decoder), translate it (encoder-decoder), fill in <mask> tokens (encoder).

- `config`: `GenerateConfig`, the options and their defaults;
- `sampling`: logits -> the next token (`Sampler`);
- `engine`: prefill and decode steps over the static KV cache, and the decoding loop;
- `recompute`: the same loop without a cache, recomputing the window every step (the oracle);
- `stream`: each row's text in whole characters, stop strings;
- `beam`: beam search; `fill_mask`: masked-LM candidates; `prompts`: reading and preparing prompts;
- `load`: a checkpoint ready to generate from; `cpu_decoding`: the CPU weight layout for batch-1 decoding.
"""
