"""Inspection: a checkpoint's anatomy and what its attention does on a prompt.

- `anatomy`: config, parameters, size, memory, training state, tokenizer;
- `stats`: per-head statistics, labels and induction scores;
- `report`: the attention report, heatmaps, the whole inspection;
- `render_terminal`: drawing it with rich; `export`: JSON, PNG and the HTML page (`page.html`).
"""
