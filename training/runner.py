"""The shape every stage script has: parse -> build -> run -> close, written once.

`run_stage` does what the stages share, in this order:

1. logging, then the config (`--resume` is short for `--train.resume`; a tuning stage needs `--init`);
   `check(config)`: the stage's own checks that need nothing but the config;
2. the tokenizer (`data.tokenizer`, else the --init model's), the output folder (an unwritable one fails
   before any work), the accelerator, the starting model (`training/finetune.starting_model`: a new one or
   --init's, checked against the tokenizer and `data.seq_len`), the downstream evaluation of an `eval`
   section (its tasks and shard texts read now, so a bad name fails before any step);
3. the stage's `build(stage)`: its data, objective, LoRA, frozen models, sampler and export, as a `Run`.
   What it opens through `stage.opened` (the data loaders) is closed whatever happens next;
4. the shared loop (training/loop.py), then the run's report card (`report.md`, training/report.py) and its
   last line.

Exit status: 0 done; 2 a mistake in the config or the set-up (one line `PROG: error: ...`, before any
training step); 1 the run stopped (non-finite losses, a checkpoint that cannot be written or resumed, an
unreadable shard, a reference that does not match the policy), with the checkpoints written so far intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from torch import nn

from common.config import ConfigError, parse_config
from common.run_folder import find_tokenizer
from data.shard_io import ShardError
from dataset.prepare import PreparedData, PreparedDataConfig
from dataset.tokenizer import Tokenizer
from models.llama import Llama
from training.checkpoint import CheckpointError
from training.config import EvalConfig
from training.distributed import build_accelerator
from training.evaluation import DownstreamEvaluator, Sampler
from training.finetune import FineTuneConfig, StageConfig, starting_model
from training.loop import NonFiniteLossError, TrainingData, finish_run, seed_everything, train
from training.lora import add_lora, checkpoint_trainable_only
from training.objectives import Objective
from training.preference import ReferenceMismatchError
from training.report import write_report

NO_MODEL = "no model: pass --init DIR (a Hugging Face Llama folder, or a checkpoint or run folder of ours)"
# Set-up mistakes: a bad key or value, a missing or unreadable file, a model that does not fit the data.
SETUP_ERRORS = (ConfigError, OSError, ValueError, ShardError)
# A run that cannot go on; its checkpoints so far are intact.
RUN_ERRORS = (NonFiniteLossError, CheckpointError, ReferenceMismatchError)

C = TypeVar("C", bound=StageConfig)
L = TypeVar("L")


@dataclasses.dataclass
class Run:
    """What a stage hands to the shared loop (training/loop.py `train`)."""

    model: nn.Module
    train_data: TrainingData
    objective: Objective
    val_data: Any = None
    frozen: Mapping[str, nn.Module] = dataclasses.field(default_factory=dict)
    sampler: Sampler | None = None
    export: Callable[[dict[str, torch.Tensor], Path], None] | None = None
    unreadable: str = "prepared data cannot be read: {}"
    """The message when a data shard turns out unreadable mid-run ({} is the shard's file:line and why)."""


@dataclasses.dataclass
class Stage:
    """What every stage builds the same way (`run_stage` steps 1-2), handed to the stage's `build`."""

    config: Any
    tokenizer: Tokenizer
    accelerator: Accelerator
    model: Llama
    closing: contextlib.ExitStack
    base_params: int = dataclasses.field(init=False)
    """The starting model's parameters, before any LoRA adapter."""

    def __post_init__(self) -> None:
        self.base_params = self.model.num_parameters()

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step over all processes: the global batch."""
        return self.config.data.batch_size * self.config.train.grad_accum_steps * self.world

    def opened(self, loader: L) -> L:
        """`loader` (None allowed), closed when the run ends, however it ends."""
        if loader is not None:
            self.closing.callback(loader.close)
        return loader

    def print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            print(text, flush=True)

    def prepare_data(
        self, prepare: Callable[..., PreparedData], build_loaders: Callable[..., tuple[L, L | None]]
    ) -> tuple[PreparedData, L, L | None]:
        """A tuning stage's prepared data (the main process prepares it, the others then find it ready) and
        this rank's training and held-out loaders."""
        config, acc = self.config, self.accelerator
        data: PreparedDataConfig = config.data
        cache_dir = data.cache_dir or str(Path(config.train.output_dir) / "data")
        with acc.main_process_first():
            log = print if acc.is_main_process else _quiet
            prepared = prepare(data, self.tokenizer, data.tokenizer, cache_dir, log=log)
        train_data, val_data = build_loaders(
            data,
            prepared,
            self.tokenizer.pad_id,
            rank=acc.process_index,
            world_size=self.world,
            rows_per_step=self.rows_per_step,
            eval_batches=config.train.eval_batches,
        )
        return prepared, self.opened(train_data), self.opened(val_data)

    def with_lora(self) -> nn.Module:
        """The starting model with the config's LoRA adapters (checkpoints then hold only them), or as it is
        without LoRA."""
        config: FineTuneConfig = self.config
        if not config.lora.enabled:
            return self.model
        seed_everything(config.train.seed)  # the adapters' initial values: the same in every run and rank
        model = add_lora(self.model, config.lora)
        checkpoint_trainable_only(self.accelerator)
        return model

    def report(self, model: nn.Module, *about: str, end: str = "") -> None:
        """The `model: N parameters; ...` line: what is trained, the stage's `about`, the batch."""
        config = self.config
        parts = [f"model: {self.base_params:,} parameters"]
        lora = getattr(config, "lora", None)
        if lora is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            how = f"LoRA rank {lora.rank}" if lora.enabled else "full fine-tuning"
            parts.append(f"training {trainable:,} ({how})")
        parts += about
        parts.append(
            f"{self.world} process(es) x {config.data.batch_size} rows x {config.data.seq_len} tokens x "
            f"{config.train.grad_accum_steps} accumulation steps per optimizer step"
        )
        self.print("; ".join(parts + ([end] if end else [])))


def run_stage(
    prog: str,
    config_class: type[C],
    build: Callable[[Stage], Run],
    argv: list[str] | None = None,
    *,
    needs_init: bool = False,
    check: Callable[[C], object] | None = None,
) -> int:
    """Run a stage (module docstring) and return its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per file saved is too chatty
    with contextlib.ExitStack() as closing:
        try:
            config = parse_config(config_class, argv, aliases={"resume": "train.resume"}, prog=prog)
            if needs_init and not config.init:
                raise ConfigError(NO_MODEL)
            if check is not None:
                check(config)
            config.data.tokenizer = find_tokenizer(config.data.tokenizer, config.init)
            tokenizer = Tokenizer.load(config.data.tokenizer)
            Path(config.train.output_dir).mkdir(parents=True, exist_ok=True)
            accelerator = build_accelerator(config.train)
            model = starting_model(config, tokenizer)  # config.model becomes the model's
            downstream = downstream_evaluator(config, model)
            run = build(Stage(config, tokenizer, accelerator, model, closing))
        except SETUP_ERRORS as exc:
            return _fail(prog, exc, 2)
        try:
            result = train(
                run.model,
                run.train_data,
                run.objective,
                config=config,
                accelerator=accelerator,
                val_data=run.val_data,
                frozen=run.frozen,
                sampler=run.sampler,
                downstream=downstream,
                export=run.export,
            )
        except RUN_ERRORS as exc:
            return _fail(prog, exc, 1)
        except ShardError as exc:
            # The loader's worker processes hand the exception over as it was raised (concurrent.futures),
            # so its message is the shard's file:line and what is wrong there.
            return _fail(prog, run.unreadable.format(exc), 1)
    if accelerator.is_main_process:
        print(f"report: {write_report(config.train.output_dir, accelerator=accelerator)}", flush=True)
    finish_run(accelerator, result)
    return 0


def downstream_evaluator(config: Any, model: Llama) -> DownstreamEvaluator | None:
    """The run's downstream evaluation (its `eval` section) with the run's tokenizer; None when off."""
    eval_config: EvalConfig | None = getattr(config, "eval", None)
    if eval_config is None or not eval_config.enabled:
        return None
    return DownstreamEvaluator(eval_config, config.data.tokenizer, model_vocab_size=model.config.vocab_size)


def _fail(prog: str, problem: object, status: int) -> int:
    print(f"{prog}: error: {problem}", file=sys.stderr)
    return status


def _quiet(*_args: object) -> None:
    pass
