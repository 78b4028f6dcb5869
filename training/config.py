"""The shared loop's config sections: optimizer and schedule, the loop itself, downstream evaluation, logging.

They are plain dataclasses documented field by field; the parsing (YAML file, `--section.key` overrides,
`--help` from the field docstrings) lives in common/config.py, and a stage's run config puts them beside
its model and data sections (see PretrainConfig in pretrain_llama.py).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from dataset.held_out import HeldOutFraction
from models.llama import RunOptions

# train.precision -> accelerate's mixed_precision
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# Adam's betas, in [0, 1) (named by jsonargparse; the held-out fraction type is the same one)
Beta = restricted_number_type(None, float, [(">=", 0), ("<", 1)])

# ---------------------------------------------------------------------------------------------------
# The shared loop's own sections (the model and data sections belong to models/ and dataset/)


@dataclasses.dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: PositiveFloat = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: ClosedUnitInterval = 0.1
    """The cosine decay ends at lr * min_lr_ratio (at train.max_steps)."""
    warmup_steps: NonNegativeInt = 2000
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    weight_decay: NonNegativeFloat = 0.1
    """Decoupled weight decay for matrices (norms, biases and embeddings get none)."""
    beta1: Beta = 0.9
    """AdamW beta1."""
    beta2: Beta = 0.95
    """AdamW beta2."""
    eps: NonNegativeFloat = 1e-8
    """AdamW epsilon."""
    grad_clip: NonNegativeFloat = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    fused: bool | None = None
    """Use torch's fused AdamW kernel; None = yes where the training device has one (CUDA, CPU, ...)."""


@dataclasses.dataclass
class TrainConfig(RunOptions):
    """Length, batch, precision, checkpointing and evaluation cadence; and how the model runs (RunOptions:
    attention kernel, fused kernels, activation checkpointing), a choice of the run, not of the model."""

    output_dir: str = "runs/pretrain"
    """Checkpoints (step-N/), metrics.jsonl, the loss curve and the final Hugging Face export go here."""
    max_steps: PositiveInt = 1000
    """Optimizer steps to train for."""
    grad_accum_steps: PositiveInt = 1
    """Micro-batches per optimizer step; global batch = micro batch x grad_accum_steps x processes."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "bf16"
    """fp32, bf16 or fp16 (autocast; master weights stay fp32), or auto: bf16 where the hardware computes it
    natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else fp32. Overrides accelerate's
    mixed_precision."""
    seed: NonNegativeInt = 0
    """Seed for model initialisation and every random number generator (per rank: seed + rank)."""
    compile: bool = False
    """torch.compile each decoder block (GPU speed feature; works on CPU too but compiles slowly)."""
    checkpoint_every: NonNegativeInt = 1000
    """Save a resumable checkpoint every N optimizer steps (and always at the end); 0 = only at the end."""
    keep_last: NonNegativeInt = 3
    """Keep only the newest K checkpoints (0 keeps all)."""
    resume: str = ""
    """'auto' resumes from the newest complete checkpoint in output_dir (fresh start when none), a path
    resumes from that step-N folder, empty starts fresh (refusing to overwrite existing checkpoints)."""
    eval_every: NonNegativeInt = 500
    """Validation loss and perplexity every N steps (and at the end); 0 disables validation."""
    eval_batches: PositiveInt = 20
    """Batches of the held-out stream per validation (the same batches every time)."""
    max_nonfinite_steps: PositiveInt = 5
    """Stop the run after this many consecutive steps with a non-finite loss (each one is skipped)."""
    peak_flops: PositiveFloat | None = None
    """Peak FLOP/s of one device for the MFU figure; None = look the GPU up in the table (n/a on CPU)."""
    export_hf: bool = True
    """Export the final model (and tokenizer) in Hugging Face format to output_dir/hf."""

    def __post_init__(self) -> None:
        if self.precision == "auto":  # resolved here, so the saved config says what the run used
            self.precision = "bf16" if native_bf16() else "fp32"

    def run_options(self) -> RunOptions:
        """How the model runs in this run (the RunOptions part of this section)."""
        return RunOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)})


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 matrices in hardware. On CPUs without AMX or AVX512-BF16,
    oneDNN emulates bf16 and autocast makes training slower than fp32, not faster."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent in some builds
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclasses.dataclass
class EvalConfig:
    """Downstream tasks and bits per byte per source, scored inside the run (docs/evaluation.md): off until
    `tasks` or `shards` names something."""

    tasks: list[str] = dataclasses.field(default_factory=list)
    """Task names as evaluate.py takes them (`core`, `arc_easy`, `arc_easy:mc_5shot`, comma-separated or a
    list); [] = no downstream tasks."""
    every: NonNegativeInt = 0
    """Score every N optimizer steps, and always at the end; 0 = only at the end."""
    limit: NonNegativeInt = 0
    """Score each task's first N documents (in its request file's order) and at most N documents per shard
    source; 0 = all."""
    batch_size: PositiveInt = 16
    """Continuations (or text windows) per forward pass."""
    shards: list[str] = dataclasses.field(default_factory=list)
    """Held-out shards (globs, files or folders of part-<source>-*.jsonl.zst): bits per byte per source;
    [] = none."""
    validation_fraction: HeldOutFraction = 0.0
    """Score only the shard documents the held-out rule keeps at this fraction (set it to the run's
    data.validation_fraction to score its own held-out split of its training shards); 0 = every document."""
    task_dir: str = ""
    """OLMo's oe_eval_tasks folder; empty = $OPEN_LLAMA_EVAL_TASKS, else the one `make setup` extracts."""

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.shards)


@dataclasses.dataclass
class LoggingConfig:
    """Where metrics go: the progress bar, metrics.jsonl, wandb, sample generations."""

    log_every: PositiveInt = 10
    """Write a metrics line (and refresh the progress bar figures) every N steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar on the main process."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (offline mode without WANDB_API_KEY); None disables wandb."""
    wandb_run_name: str | None = None
    """wandb run name (default: the output folder's name); when set, also the run's name in report.md and its
    export's model name (default: docs/training.md, the report card)."""
    sample_every: NonNegativeInt = 0
    """Generate from sample_prompts every N steps and log the text; 0 disables sampling."""
    sample_prompts: list[str] = dataclasses.field(
        default_factory=lambda: ["The meaning of life is", "def fibonacci(n):", "今天天气"]
    )
    """Fixed prompts for the periodic sample generations."""
    sample_max_new_tokens: PositiveInt = 32
    """Tokens generated per sample."""
    plot: bool = True
    """Write loss_curve.png (train and validation loss) at the end."""
