"""Training: configs and presets, objectives, the optimizer and schedules, evaluation, the state saved
beside the weights, planning a run from the command line, the loop, and distributed training.

- `config`: `TrainConfig` and training presets; `options`: flags and --config files -> configs;
- `plan`: a run planned and checked before any file is written; `loop`: `train`;
- `objectives`, `optim`, `evaluate`, `state`, `distributed`.
"""
