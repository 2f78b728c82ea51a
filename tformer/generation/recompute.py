"""The recompute oracle: decoding without a KV cache, the whole window again at every step.

Slow (each step costs a forward pass over the window), and for that reason simple: it is what the
cached engine is tested against (`tformer generate --no-cache`).
"""

from __future__ import annotations

from torch import Tensor, nn

from tformer.generation.window import Head, Window, logits_only, row_positions


class RecomputeWindow(Window):
    """A window recomputed from scratch at every step; `memory` is the encoder output (encoder-decoder)."""

    def __init__(self, model: nn.Module, batch: int, size: int, keep: int, head: Head = logits_only,
                 memory: Tensor | None = None, memory_mask: Tensor | None = None):
        super().__init__(model, batch, size, keep, head)
        self.memory, self.memory_mask = memory, memory_mask

    def run_window(self, *head_args: Tensor) -> Tensor:
        ids, real = self.ids[:, :self.n], self.real[:, :self.n]
        logits = self.model.next_token_logits(ids, real, row_positions(real), memory=self.memory,
                                              memory_padding_mask=self.memory_mask)
        return self.head(logits, *head_args)

    def advance(self, *head_args: Tensor) -> Tensor:
        return self.run_window(*head_args)

    def select_rows(self, index: Tensor) -> None:
        super().select_rows(index)
        if self.memory is not None:
            self.memory, self.memory_mask = self.memory.index_select(0, index), self.memory_mask.index_select(0, index)
