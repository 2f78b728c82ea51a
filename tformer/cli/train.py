"""`tformer train`: options in panels, a live view of the run, and its summary."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tformer.cli.common import (
    THREADS_HELP,
    app,
    console,
    print_note,
    set_threads,
    user_errors,
)
from tformer.cli.train_view import TrainView, summary
from tformer.config import ACTIVATIONS, NORM_PLACEMENTS, NORMS, POS_ENCODINGS, PRESETS
from tformer.training.config import PAIRS_PRESET, TRAIN_PRESETS, TrainConfig

DEFAULT_PRESET = "tiny"
_TINY = TRAIN_PRESETS[DEFAULT_PRESET]["train"]


def _default(name: str) -> str:
    """What an option is when not given: the default preset's value, else TrainConfig's."""
    value = _TINY.get(name, getattr(TrainConfig, name, None))
    return "preset" if value is None else str(value)


def _opt(meta: str, *names: str, help: str, panel: str, default: str | None = None, **kw):
    """An option that is None unless given (so presets and --config fill in), its default shown in --help."""
    # a short metavar (N, X, NAME, PATH) instead of a type tag on every line
    return typer.Option(None, *names, help=help, rich_help_panel=panel, show_default=default or False, metavar=meta,
                        **kw)


DATA, MODEL, OPTIM, SCHEDULE, EVAL, CKPT, DEVICE = ("Data", "Model", "Optimisation", "Schedule", "Evaluation",
                                                    "Checkpoints", "Device")
PRESET_NAMES = ", ".join([DEFAULT_PRESET] + sorted((set(TRAIN_PRESETS) | set(PRESETS)) - {DEFAULT_PRESET}))


@app.command("train")
def train_command(
    corpus: Optional[List[Path]] = typer.Argument(
        None, help="Text files, directories, a .tsv of source<TAB>target pairs, or a `tformer tokenize` "
                   "output directory. Default: the built-in corpus.", show_default=False),
    # data
    kind: Optional[str] = _opt("NAME", help="Tokenizer for raw text: bpe, char or byte.", panel=DATA,
                               default=f"bpe; char with --preset {PAIRS_PRESET}"),
    vocab_size: Optional[int] = _opt("N", "--vocab-size", help="BPE vocabulary size.", panel=DATA, default="4096"),
    tokenizer: Optional[Path] = _opt("PATH", help="Encode raw text with this tokenizer.json.", panel=DATA),
    context: Optional[int] = _opt("N", help="Tokens per training sequence.", panel=DATA, default=_default("context")),
    # model
    arch: Optional[str] = _opt("NAME", help="encoder, decoder or encoder-decoder.", panel=MODEL, default="decoder"),
    preset: Optional[str] = _opt("NAME", help=f"Model and training preset: {PRESET_NAMES}.", panel=MODEL,
                                 default=f"{DEFAULT_PRESET}; {PAIRS_PRESET} for a .tsv of pairs"),
    config: Optional[Path] = _opt("PATH", "--config", help="A TOML file of options; flags override it.", panel=MODEL),
    d_model: Optional[int] = _opt("N", "--d-model", help="Model width.", panel=MODEL, default="preset"),
    layers: Optional[int] = _opt("N", help="Layers (of each stack).", panel=MODEL, default="preset"),
    heads: Optional[int] = _opt("N", help="Attention heads.", panel=MODEL, default="preset"),
    kv_heads: Optional[int] = _opt("N", "--kv-heads", help="Key/value heads (grouped-query attention; a divisor of "
                                   "--heads).", panel=MODEL, default="--heads"),
    d_ff: Optional[int] = _opt("N", "--d-ff", help="Feed-forward width.", panel=MODEL, default="preset"),
    norm: Optional[str] = _opt("NAME", help=f"Normalisation: {', '.join(NORMS)}.", panel=MODEL, default="preset"),
    norm_placement: Optional[str] = _opt("NAME", "--norm-placement", help=f"{', '.join(NORM_PLACEMENTS)} (post: as in the "
                                         "paper; pre: GPT-2 and later).", panel=MODEL, default="preset"),
    pos_encoding: Optional[str] = _opt("NAME", "--pos-encoding", help=f"Positions: {', '.join(POS_ENCODINGS)}.",
                                       panel=MODEL, default="preset"),
    activation: Optional[str] = _opt("NAME", help=f"Feed-forward activation: {', '.join(ACTIVATIONS)}.", panel=MODEL,
                                     default="preset"),
    bias: Optional[bool] = _opt("", "--bias/--no-bias", help="Biases in the linear layers and norms.", panel=MODEL,
                                default="preset"),
    tie_embeddings: Optional[bool] = _opt("", "--tie-embeddings/--no-tie-embeddings", help="Share the input embedding "
                                          "and the output projection.", panel=MODEL, default="preset"),
    dropout: Optional[float] = _opt("X", help="Dropout probability.", panel=MODEL, default="preset"),
    # optimisation
    batch_size: Optional[int] = _opt("N", "--batch-size", help="Sequences per micro-batch (under torchrun: the global "
                                     "one, split over the ranks).", panel=OPTIM, default=_default("batch_size")),
    grad_accum: Optional[int] = _opt("N", "--grad-accum", help="Micro-batches per optimizer step.", panel=OPTIM,
                                     default=_default("grad_accum")),
    lr: Optional[float] = _opt("X", help="Peak learning rate.", panel=OPTIM, default=_default("lr")),
    optimizer: Optional[str] = _opt("NAME", help="adamw, or muon: Muon for the hidden weight matrices (attention and "
                                    "feed-forward), AdamW for embeddings, norms and biases.", panel=OPTIM,
                                    default=_default("optimizer")),
    muon_lr: Optional[float] = _opt("X", "--muon-lr", help="Muon's peak learning rate (with --optimizer muon; the "
                                    "schedule scales it as --lr).", panel=OPTIM, default=_default("muon_lr")),
    weight_decay: Optional[float] = _opt("X", "--weight-decay", help="AdamW weight decay (not on norms, biases, "
                                         "embeddings).", panel=OPTIM, default=_default("weight_decay")),
    clip: Optional[float] = _opt("X", help="Gradient-norm clipping (0: off).", panel=OPTIM, default=_default("clip")),
    label_smoothing: Optional[float] = _opt("X", "--label-smoothing", help="Encoder-decoder label smoothing.",
                                            panel=OPTIM, default=_default("label_smoothing")),
    seed: Optional[int] = _opt("N", help="Random seed.", panel=OPTIM, default=_default("seed")),
    # schedule
    steps: Optional[int] = _opt("N", help="Optimizer steps.", panel=SCHEDULE, default=_default("steps")),
    epochs: Optional[float] = _opt("X", help="Passes over the training data (instead of --steps).", panel=SCHEDULE),
    time_budget: Optional[float] = _opt("X", "--time-budget", help="Stop (and save) after this many seconds of this "
                                        "command (a resumed run gets the whole budget again).", panel=SCHEDULE),
    decay_to_budget: Optional[bool] = _opt("", "--decay-to-budget/--no-decay-to-budget", help="With --time-budget: "
                                           "the cosine reaches its floor when the budget ends, if that comes "
                                           "before the last step.", panel=SCHEDULE, default=_default("decay_to_budget")),
    warmup: Optional[int] = _opt("N", help="Warmup steps.", panel=SCHEDULE, default=_default("warmup")),
    schedule: Optional[str] = _opt("NAME", help="cosine, noam (the paper's) or constant.", panel=SCHEDULE,
                                   default=_default("schedule")),
    # evaluation
    eval_every: Optional[int] = _opt("N", "--eval-every", help="Steps between evaluations (loss, perplexity, token "
                                     "accuracy; BLEU for encoder-decoder pairs, with sacrebleu installed).",
                                     panel=EVAL, default=_default("eval_every")),
    eval_batches: Optional[int] = _opt("N", "--eval-batches", help="Validation batches (0: the whole split).",
                                       panel=EVAL, default=_default("eval_batches")),
    log_every: Optional[int] = _opt("N", "--log-every", help="Steps between log lines.", panel=EVAL,
                                    default=_default("log_every")),
    quiet: bool = typer.Option(False, "--quiet", help="Print only the final summary.", rich_help_panel=EVAL),
    # checkpoints
    out: Optional[Path] = _opt("PATH", help="Run directory.", panel=CKPT, default="checkpoints/<corpus>-<arch>"),
    save_every: Optional[int] = _opt("N", "--save-every", help="Steps between checkpoints.", panel=CKPT,
                                     default=_default("save_every")),
    resume: Optional[str] = _opt("NAME", help="Continue a run: `auto` (the latest of --out), a run or checkpoint "
                                 "directory. New raw text is encoded with the run's tokenizer.", panel=CKPT),
    init_from: Optional[str] = _opt("NAME", "--init-from", help="Start from a checkpoint's weights and tokenizer (ours, a "
                                    "Hugging Face directory, or a Hub name).", panel=CKPT),
    force: bool = typer.Option(False, "--force", help="Replace an existing run in --out (once the new one is "
                               "checked).", rich_help_panel=CKPT),
    # device
    device: Optional[str] = _opt("NAME", help="auto, cpu, cuda or mps.", panel=DEVICE, default="auto"),
    dtype: Optional[str] = _opt("NAME", help="auto, fp32, bf16 or fp16 (or float32, bfloat16, float16).", panel=DEVICE,
                                default="auto"),
    compile: Optional[bool] = _opt("", "--compile/--no-compile", help="torch.compile the model.", panel=DEVICE,
                                   default="no-compile"),
    fsdp: Optional[bool] = _opt("", "--fsdp/--no-fsdp", help="Under torchrun: shard parameters, gradients and "
                                "optimizer state with FSDP2 instead of DDP.", panel=DEVICE, default="no-fsdp"),
    threads: Optional[int] = _opt("N", help=THREADS_HELP, panel=DEVICE, default="one per core"),
    processes: Optional[int] = _opt("N", help="CPU: split each batch's rows over N processes of one thread each, "
                                    "sharing the weights (faster than threads for small models); 1 turns it off.",
                                    panel=DEVICE, default="one per thread on a Linux CPU"),
) -> None:
    """Train a model on your text (decoder: causal LM; encoder: masked LM; encoder-decoder: pairs or denoising)."""
    from tformer.training import distributed
    from tformer.training import loop as core
    from tformer.training.plan import plan_run

    set_threads(threads)
    options = dict(arch=arch, d_model=d_model, layers=layers, heads=heads, kv_heads=kv_heads, d_ff=d_ff, norm=norm,
                   norm_placement=norm_placement, pos_encoding=pos_encoding, activation=activation, bias=bias,
                   tie_embeddings=tie_embeddings, context=context, batch_size=batch_size, grad_accum=grad_accum,
                   steps=steps, epochs=epochs, time_budget=time_budget, decay_to_budget=decay_to_budget, lr=lr,
                   optimizer=optimizer, muon_lr=muon_lr, warmup=warmup, schedule=schedule,
                   weight_decay=weight_decay, dropout=dropout, clip=clip, label_smoothing=label_smoothing, seed=seed,
                   device=device, dtype=dtype, compile=compile, eval_every=eval_every, eval_batches=eval_batches,
                   save_every=save_every, log_every=log_every, preset=preset, fsdp=fsdp,
                   processes=processes)
    # distributed: under torchrun, join the process group; rank 0 alone prints and prepares the data first
    with user_errors(), distributed.process_group():
        view = TrainView(quiet or not distributed.is_main())
        plan = None
        try:
            with distributed.rank_zero_first():
                plan = plan_run(corpus, options, config_file=config, out=out, resume=resume,
                                init_from=None if init_from is None else Path(init_from), force=force, kind=kind,
                                vocab_size=vocab_size, tokenizer=tokenizer, on_tokenize=view.tokenizing,
                                lock=distributed.is_main())  # one training per --out (rank 0 holds it)
            view.planned()
            for message in plan.notes:
                print_note(message)
            stop = core.StopFlag()
            with stop.installed():
                result = core.train(plan.model_cfg, plan.train_cfg, plan.data, plan.out, resume=plan.resume,
                                    init_from=plan.init_model, on_event=view, stop=stop,
                                    extra_config=plan.extra_config)
        finally:
            view.close()
            if plan is not None:
                plan.release()
        if distributed.is_main():
            summary(result, view, plan)
            if distributed.world_size() > 1 and result.stopped != "done":
                console.print(f"(under torchrun, with its options as before or any number of ranks: torchrun ... "
                              f"-m tformer train --out {result.out_dir} --resume auto)",
                              highlight=False, soft_wrap=True)
