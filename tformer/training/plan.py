"""Planning a run from what the user gave: the output directory, the tokens, and every check before a file is written."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tformer import limits
from tformer.checkpoint import (
    OPTIMIZER_FILE,
    TOKENIZER_FILE,
    TRAINER_STATE_FILE,
    load_checkpoint,
    read_config,
    resolve_checkpoint,
)
from tformer.checkpoint_checks import read_trainer_state
from tformer.config import ModelConfig
from tformer.data.batches import steps_per_epoch
from tformer.device import resolve_device, resolve_precision
from tformer.errors import TformerError
from tformer.files import recover_directory, swap_directory
from tformer.training.config import PAIRS_PRESET, TrainConfig, preset_kind
from tformer.training.lock import RunLock
from tformer.training.objectives import OBJECTIVES, TrainData
from tformer.training.options import read_toml, resolve_configs
from tformer.training.resume import resume_dir


def total_steps_for(cfg: TrainConfig, data: TrainData) -> int:
    """Optimizer steps of the run: --steps, else --epochs passes over the training data."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        per_epoch = steps_per_epoch(data.objective, data.n_train, cfg.context,
                                    cfg.batch_size * cfg.grad_accum * cfg.context, cfg.batch_size * cfg.grad_accum)
        return max(1, math.ceil(cfg.epochs * per_epoch))
    from tformer.training.config import DEFAULT_STEPS

    return DEFAULT_STEPS


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """--out must be writable, and an existing run is continued (resume) or replaced (force), never silently."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TformerError(f"cannot write to --out '{out}': {e.strerror or e}") from None
    recover_directory(out / "latest")
    recover_directory(out / "best")
    if not resume and not force and ((out / "latest").exists() or (out / "best").exists()):
        raise TformerError(
            f"'{out}' already holds a training run; continue it with --resume auto, "
            f"start over with --force, or choose another --out"
        )


def check_data(data: TrainData, cfg: TrainConfig) -> None:
    """Each split of flat text must hold at least one training window."""
    if data.objective == "pairs":
        return
    needed = cfg.context + 1
    for split, tokens in (("training", data.train_tokens), ("validation", data.val_tokens)):
        if len(tokens) < needed:
            raise TformerError(
                f"the {split} split has {len(tokens)} tokens, fewer than one context window "
                f"({needed}); use a smaller --context or more text"
            )


# -- planning a run from what the user gave ---------------------------------------------------------

@dataclass
class RunPlan:
    """A resolved run: configs, data, where it goes, and what it starts from."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data: TrainData
    out: Path
    resume: Path | None = None
    init_model: nn.Module | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)
    sample: Callable[[nn.Module], str] | None = None
    notes: list[str] = field(default_factory=list)  # how inputs were understood (e.g. which checkpoint)
    lock: RunLock | None = None  # held on `out` while the run trains

    def release(self) -> None:
        """Let another training use `out` (the end of the process does this too)."""
        if self.lock is not None:
            self.lock.release()


TOKENS_SUBDIR = "data"  # raw text is tokenized into <out>/data, and reused while the corpus is unchanged
STAGING_SUBDIR = ".data.pending"  # new tokens wait here until the run has passed every check
_CACHE_KEY_FILE = "cache_key.json"


def _corpus_name(corpus: list[Path] | None) -> str:
    from tformer.data.corpus import DEFAULT_CORPUS_NAME

    if not corpus:
        return DEFAULT_CORPUS_NAME
    first = Path(corpus[0])
    return (first.stem if first.suffix else first.name) or "corpus"


def _cache_key(paths: list[Path], kind: str | None, vocab_size: int | None, tokenizer: Path | None) -> dict:
    """What the cached tokens depend on: the corpus files (path, size, modification time) and the options."""
    from tformer.data.corpus import find_corpus

    files = [[str(s.path.resolve()), s.size, os.stat(s.path).st_mtime_ns] for s in find_corpus(paths)]
    tok = None
    if tokenizer is not None:
        tok_path = Path(tokenizer).resolve()
        tok = [str(tok_path), os.stat(tok_path).st_mtime_ns] if tok_path.exists() else str(tok_path)
    return {"files": files, "kind": kind, "vocab_size": vocab_size, "tokenizer": tok}


def _is_token_dir(corpus: list[Path] | None) -> bool:
    """Whether CORPUS is a directory written by `tformer tokenize` (rather than raw text)."""
    return bool(corpus) and len(corpus) == 1 and (Path(corpus[0]) / "meta.json").is_file()


def _is_pairs(corpus: list[Path] | None) -> bool:
    """Whether CORPUS is source/target pairs: .tsv files, or a `tformer tokenize` directory of them."""
    if not corpus:
        return False
    if _is_token_dir(corpus):
        try:
            return json.loads((Path(corpus[0]) / "meta.json").read_text(encoding="utf-8")).get("layout") == "pairs"
        except (OSError, ValueError, AttributeError):
            return False  # the planning that follows names what is wrong with it
    return all(Path(p).suffix.lower() == ".tsv" for p in corpus)


def prepare_tokens(
    corpus: list[Path] | None, cache_dir: Path, kind: str | None, vocab_size: int | None,
    tokenizer: Path | None, on_tokenize: Callable | None = None, staging: Path | None = None,
) -> Path:
    """A token directory for `corpus`: itself if it already is one, else the corpus tokenized into
    `cache_dir` (reused when the files and options are unchanged). With `staging`, new tokens are built
    there instead, and `cache_dir` is left as it is: the caller swaps them in once every check has passed."""
    from tformer.data.corpus import default_corpus
    from tformer.data.prepare import tokenize_corpus

    if _is_token_dir(corpus):
        if kind or vocab_size or tokenizer:
            raise TformerError(f"'{corpus[0]}' is already tokenized; --kind, --vocab-size and --tokenizer "
                               f"apply only to raw text")
        return Path(corpus[0])
    paths = [Path(p) for p in corpus] if corpus else [default_corpus()]
    key = _cache_key(paths, kind, vocab_size, tokenizer)
    key_file = cache_dir / _CACHE_KEY_FILE
    if key_file.is_file() and (cache_dir / "meta.json").is_file():
        try:
            if json.loads(key_file.read_text(encoding="utf-8")) == key:
                return cache_dir
        except json.JSONDecodeError:
            pass
    target = cache_dir if staging is None else staging
    tokenize_corpus(paths, target, kind=kind, vocab_size=vocab_size, tokenizer=tokenizer, force=True,
                    progress=on_tokenize)
    from tformer.files import atomic_write_json

    atomic_write_json(target / _CACHE_KEY_FILE, key)
    return target


def _same_tokenizer(a: Path, b: Path) -> bool:
    from tformer.data.tokenizer import load_tokenizer

    return load_tokenizer(a).get_vocab(with_added_tokens=True) == load_tokenizer(b).get_vocab(with_added_tokens=True)


def plan_run(
    corpus: list[Path] | None,
    options: dict[str, Any],
    *,
    config_file: Path | None = None,
    out: Path | None = None,
    resume: str | None = None,
    init_from: Path | None = None,
    force: bool = False,
    kind: str | None = None,
    vocab_size: int | None = None,
    tokenizer: Path | None = None,
    on_tokenize: Callable | None = None,
    lock: bool = False,
) -> RunPlan:
    """Resolve what `tformer train` was given into a RunPlan, checking everything before any file is written.

    With `lock`, the run directory is locked against a second training (see `training.lock`) until
    `RunPlan.release()`; the plan holds the lock."""
    notes: list[str] = []
    flags = {k: v for k, v in options.items() if v is not None}
    options = {**(read_toml(Path(config_file)) if config_file else {}), **flags}
    if resume is not None and init_from is not None:
        raise TformerError("--resume continues a run and --init-from starts a new one from weights; choose one")
    arch = options.get("arch")
    if resume is None and init_from is None:
        if options.get("preset") is None and arch == "encoder-decoder" and _is_pairs(corpus):
            options["preset"] = PAIRS_PRESET
            notes.append(f"pairs train with --preset {PAIRS_PRESET} unless another is named")
        if kind is None and vocab_size is None and tokenizer is None and not _is_token_dir(corpus):
            kind = preset_kind(options.get("preset"))  # e.g. characters for transduction

    base_model = base_train = None
    init_model = None
    ckpt_tokenizer: Path | None = None
    ckpt_dir: Path | None = None
    if resume is not None:
        if resume == "auto" and out is None:
            raise TformerError("--resume auto needs --out, the run directory to continue")
        if out is None:
            given = Path(resume)
            out = given.parent if given.name in ("latest", "best") or given.name.startswith(".") else given
        ckpt_dir = resume_dir(resume, out)
        base_model, _, extra = read_config(ckpt_dir)
        if "train" not in extra:
            raise TformerError(f"'{ckpt_dir}' was not written by tformer train; use --init-from to start from it")
        if arch is not None and arch != base_model.arch:
            raise TformerError(f"cannot resume '{ckpt_dir}' as arch={arch!r}: it is a {base_model.arch!r} model")
        base_train = TrainConfig.from_dict(extra["train"])
        state = read_trainer_state(ckpt_dir, TRAINER_STATE_FILE, OPTIMIZER_FILE)  # before anything is touched
        if state.get("arch", base_model.arch) != base_model.arch:
            raise TformerError(f"cannot resume '{ckpt_dir}': its training state is for arch={state['arch']!r}, "
                               f"its model is {base_model.arch!r}")
        ckpt_tokenizer = ckpt_dir / TOKENIZER_FILE
        kind = vocab_size = None  # the run's tokenizer is fixed: these only said how to build one
        data_dir = (extra.get("data") or {}).get("directory")
        if not corpus and isinstance(data_dir, str) and data_dir:
            corpus = [recorded_data_dir(data_dir, out)]
    elif init_from is not None:
        init_path, note = resolve_checkpoint(init_from)
        if note:
            notes.append(note)
        ckpt = load_checkpoint(init_path)
        if ckpt.tokenizer_path is None:
            raise TformerError(f"'{init_from}' has no tokenizer.json; --init-from needs the checkpoint's tokenizer")
        if arch is not None and arch != ckpt.config.arch:
            raise TformerError(f"--arch {arch} disagrees with '{init_from}', a {ckpt.config.arch!r} model")
        base_model, init_model, ckpt_tokenizer = ckpt.config, ckpt.model, ckpt.tokenizer_path
        if tokenizer is not None or kind is not None or vocab_size is not None:
            raise TformerError("--init-from trains with the checkpoint's own tokenizer; drop --tokenizer, "
                               "--kind and --vocab-size")
    if ckpt_tokenizer is not None and tokenizer is None and not _is_token_dir(corpus):
        tokenizer = ckpt_tokenizer  # raw text is encoded with the checkpoint's own tokenizer
    if base_model is not None:
        options["arch"] = base_model.arch  # equal to --arch when given (checked above)
    model_cfg, train_cfg = resolve_configs(options, base_model, base_train)

    device = resolve_device(train_cfg.device)
    resolve_precision(train_cfg.dtype, device)  # an unavailable device fails here
    # before any token is made: a new run's vocabulary is not known yet, so count it low
    check_training_memory(model_cfg if base_model is not None else model_cfg.replace(vocab_size=256),
                          train_cfg, device)
    if out is None:
        out = Path("checkpoints") / f"{_corpus_name(corpus)}-{model_cfg.arch}"
    run_lock = RunLock(out) if lock else None
    with _removed_on_error(out):
        if run_lock is not None:
            run_lock.acquire()
        try:
            plan = _plan_data(corpus, out, model_cfg, train_cfg, force=force, kind=kind, vocab_size=vocab_size,
                              tokenizer=tokenizer, on_tokenize=on_tokenize, base_model=base_model,
                              ckpt_dir=ckpt_dir, ckpt_tokenizer=ckpt_tokenizer, init_from=init_from,
                              init_model=init_model)
        except BaseException:
            if run_lock is not None:
                run_lock.release()
            raise
    plan.notes = notes
    plan.lock = run_lock
    return plan


def check_training_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, device: Any) -> None:
    """Refuse a run whose weights, optimizer state and one micro-batch cannot fit (one process: under
    torchrun the batch and, with --fsdp, the weights are shared out, so the check is left to each rank)."""
    from tformer.training import distributed

    if distributed.world_size() > 1:
        return
    needed = limits.training_bytes(model_cfg, train_cfg.batch_size, train_cfg.context)
    limits.check_memory(f"training this model ({limits.parameter_count(model_cfg):,} parameters, batch "
                        f"{train_cfg.batch_size} x {train_cfg.context} tokens)", needed, device,
                        advice="use a smaller model, --batch-size or --context (--grad-accum keeps the step size)")


def recorded_data_dir(recorded: str, out: Path) -> Path:
    """The token directory a run's config.json names: relative to the run (so a moved run finds its data);
    older runs recorded it relative to the directory they were started from, tried second."""
    path = Path(recorded)
    if path.is_absolute():
        return path
    inside = out / path
    return inside if inside.exists() or not path.exists() else path


def data_dir_to_record(token_dir: Path, out: Path) -> str:
    """How a run records its token directory: relative to the run when it is inside it, else absolute."""
    try:
        return str(token_dir.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(token_dir.resolve())


@contextmanager
def _removed_on_error(directory: Path) -> Iterator[None]:
    """A run rejected while it is being planned leaves no trace: `directory` goes again if it is new, and
    so do the parents that were made for it."""
    new = None
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        new = candidate  # the topmost directory that does not exist yet
    try:
        yield
    except BaseException:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        raise


def _plan_data(
    corpus: list[Path] | None, out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, *, force: bool,
    kind: str | None, vocab_size: int | None, tokenizer: Path | None, on_tokenize: Callable | None,
    base_model: ModelConfig | None, ckpt_dir: Path | None, ckpt_tokenizer: Path | None,
    init_from: Path | None, init_model: nn.Module | None,
) -> RunPlan:
    """The second half of `plan_run`: --out, the tokens, and the checks that need them."""
    if ckpt_dir is None:
        check_out_dir(out, resume=False, force=force)
    staging = out / STAGING_SUBDIR
    recover_directory(staging)
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while it was being planned
    try:
        # new tokens are built beside the run's own, and replace them only once every check has passed
        token_dir = prepare_tokens(corpus, out / TOKENS_SUBDIR, kind, vocab_size, tokenizer, on_tokenize, staging)
        args = (out, model_cfg, train_cfg, base_model, ckpt_dir, ckpt_tokenizer, init_from, init_model)
        plan = _check_tokens(token_dir, *args)
        if token_dir == staging:
            swap_directory(staging, out / TOKENS_SUBDIR)
            plan = _check_tokens(out / TOKENS_SUBDIR, *args)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return plan


def _check_tokens(
    token_dir: Path, out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, base_model: ModelConfig | None,
    ckpt_dir: Path | None, ckpt_tokenizer: Path | None, init_from: Path | None, init_model: nn.Module | None,
) -> RunPlan:
    """Every check that needs the tokens, and the plan they give; nothing is written."""
    from tformer.data.tokens import open_tokens

    tokens = open_tokens(token_dir)
    tokenizer_path = token_dir / tokens.meta["tokenizer"]
    if ckpt_tokenizer is not None and not _same_tokenizer(ckpt_tokenizer, tokenizer_path):
        raise TformerError(
            f"the tokenizer of the checkpoint does not match the data in '{token_dir}'; tokenize the text "
            f"with --tokenizer {ckpt_tokenizer}"
        )
    if base_model is None:
        model_cfg = model_cfg.replace(vocab_size=tokens.vocab_size)
    elif tokens.vocab_size > model_cfg.vocab_size:
        raise TformerError(f"the data's vocabulary ({tokens.vocab_size}) is larger than the model's "
                           f"({model_cfg.vocab_size})")

    if tokens.is_pairs and model_cfg.arch != "encoder-decoder":
        raise TformerError(f"a .tsv of source/target pairs trains --arch encoder-decoder, not {model_cfg.arch}; "
                           f"give plain text for a {model_cfg.arch}")
    objective = OBJECTIVES.get(model_cfg.arch) or ("pairs" if tokens.is_pairs else "span")
    need = {"masked": ("mask",), "span": ("mask", "eos", "pad", "bos"), "pairs": ("eos", "pad", "bos")}
    missing = [r for r in need.get(objective, ()) if getattr(tokens.special, r) is None]
    if missing:
        raise TformerError(f"the {model_cfg.arch} objective needs the special token(s) {', '.join(missing)}, "
                           f"which this tokenizer lacks")
    if tokens.is_pairs:
        data = TrainData(objective, tokens.special, tokens.vocab_size, tokenizer_path,
                         train_pairs=tokens.pairs("train"), val_pairs=tokens.pairs("val"))
        if len(data.train_pairs) == 0 or len(data.val_pairs) == 0:
            raise TformerError(f"'{token_dir}' needs training and validation pairs (it has "
                               f"{len(data.train_pairs)} and {len(data.val_pairs)})")
    else:
        data = TrainData(objective, tokens.special, tokens.vocab_size, tokenizer_path,
                         train_tokens=tokens.tokens("train"), val_tokens=tokens.tokens("val"))
    data.source = {"directory": data_dir_to_record(token_dir, out), "kind": tokens.meta.get("kind"),
                   "tokens": tokens.meta.get("tokens"), "sources": tokens.meta.get("sources")}
    check_data(data, train_cfg)
    check_training_memory(model_cfg, train_cfg, resolve_device(train_cfg.device))
    if ckpt_dir is not None:
        check_out_dir(out, resume=True, force=False)
    extra = {"init_from": str(init_from)} if init_from is not None else {}
    return RunPlan(model_cfg, train_cfg, data, out, ckpt_dir, init_model, extra, _sampler(model_cfg, tokens))


def _sampler(model_cfg: ModelConfig, tokens: Any) -> Callable[[nn.Module], str] | None:
    """The short text printed at the end of a decoder's training run."""
    if model_cfg.arch != "decoder":
        return None

    def sample(model: nn.Module) -> str:
        from tformer.generation.generate import sample_continuation

        return sample_continuation(model, tokens.tokenizer, max_new_tokens=100)

    return sample
