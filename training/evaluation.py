"""Periodic validation (the objective's loss and metrics on held-out batches), downstream evaluation (tasks and
bits per byte per source, evaluation/) and sample generations."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType
from accelerate.utils import gather_object
from torch import nn

from evaluation.encoding import TextEncoder, check_vocabulary
from evaluation.evaluator import sample_figures, score_share
from evaluation.metrics import core_score
from evaluation.tasks import CORE, Task, load_task, resolve_tasks, task_dir
from evaluation.text_bpb import SourceBits, source_texts, text_bits
from models.generate import generate
from training.config import EvalConfig
from training.objectives import Objective


class Validator:
    """The objective's means over the same `num_batches` held-out batches at every evaluation.

    The batches are taken once from the validation stream and kept, so successive validation losses
    are comparable. Each rank evaluates its own batches; the result is the count-weighted mean over all.
    """

    def __init__(
        self, val_data: Iterable[dict[str, torch.Tensor]] | None, *, every: int, num_batches: int
    ) -> None:
        self.every = every
        # Decided by the config alone, never by this rank's batches: validation is collective, and a rank
        # whose share of the held-out data is empty must still join the others' reduction.
        self.enabled = val_data is not None and every > 0
        self.batches = list(itertools.islice(val_data, num_batches)) if self.enabled else []

    def should_run(self, step: int, *, final: bool = False) -> bool:
        """Due every `every` steps and at the end (when there is validation data)."""
        return self.enabled and (final or step % self.every == 0)

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        objective: Objective,
        frozen: Mapping[str, nn.Module],
        accelerator: Accelerator,
    ) -> dict[str, float]:
        """{'val_loss', 'val_<metric>'..., 'val_<derived>'...} over all ranks' held-out batches ({} when
        every rank's batches are empty). Each rank evaluates as many batches as the rank with the fewest."""
        batches = self.batches
        if accelerator.num_processes > 1:
            # Every rank must run the same number of forward passes (DDP, ZeRO-3 and FSDP forwards are
            # collective, and a rank left waiting hangs the run), and held-out shares can differ by rank.
            n = torch.tensor([len(batches)], device=accelerator.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            batches = batches[: int(n.item())]
        was_training = model.training
        model.eval()
        names: list[str] = []
        totals: list[torch.Tensor] = []
        count_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                out = objective(model, batch, frozen)
            count = torch.as_tensor(objective.count(batch), dtype=torch.float64, device=count_total.device)
            values = {"loss": out.loss, **out.metrics}
            if not names:
                names, totals = list(values), [torch.zeros_like(count_total) for _ in values]
            for i, name in enumerate(names):
                totals[i] += values[name].double() * count
            count_total += count
        model.train(was_training)
        stacked = torch.stack([*totals, count_total]) if names else count_total.reshape(1)
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="sum")
        if stacked[-1] == 0:  # no held-out items anywhere: nothing comparable to report
            return {}
        means = dict(zip(names, (stacked[:-1] / stacked[-1]).tolist()))
        return {f"val_{name}": value for name, value in {**means, **objective.report(means)}.items()}


class DownstreamEvaluator:
    """Downstream tasks and bits per byte per source (EvalConfig) every `every` steps and at the end.

    The tasks and the shard texts are read once, at set-up (a bad task name or an empty shard glob fails the
    run before its first step). A score depends only on the weights: the evaluation draws no random numbers
    and keeps no state, so a resumed run logs the same figures at the same steps. Each rank scores every
    `world`-th document of each task and source and the per-document scores are gathered, so the figures are
    those of one process; where the parameters are sharded (ZeRO-3, FSDP) forwards are collective, and every
    rank scores everything instead.
    """

    def __init__(self, config: EvalConfig, tokenizer_folder: str | Path, *, model_vocab_size: int) -> None:
        self.every = config.every
        self.batch_size = config.batch_size
        self.encoder = TextEncoder(tokenizer_folder)  # the run's tokenizer, as its Hugging Face files
        check_vocabulary(self.encoder, model_vocab_size)
        self.tasks: list[Task] = []
        if config.tasks:
            folders = resolve_tasks(config.tasks, task_dir(config.task_dir))
            self.tasks = [load_task(name, path, config.limit) for name, path in folders.items()]
        self.texts: dict[str, list[str]] = {}
        if config.shards:
            self.texts = source_texts(
                config.shards, validation_fraction=config.validation_fraction, limit=config.limit
            )
            if not any(self.texts.values()):
                fraction = config.validation_fraction
                held = f" held out at validation_fraction {fraction}" if fraction else ""
                raise ValueError(f"eval.shards: no documents{held} in {config.shards}")

    def should_run(self, step: int, *, final: bool = False) -> bool:
        """Due every `every` steps (0: never before the end) and at the end."""
        return final or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def run(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """{'eval/<task>/accuracy', 'eval/<task>/centered', 'eval/<task>/bpb', 'eval/core' (when every CORE
        task ran), 'eval/bpb/<source>'}, the same on every rank. All ranks call it."""
        module = accelerator.unwrap_model(model)
        if hasattr(module, "get_base_model"):  # a LoRA PeftModel: our Llama inside, adapters in place
            module = module.get_base_model()
        rank, world = accelerator.process_index, accelerator.num_processes
        if _parameters_sharded(accelerator):
            rank, world = 0, 1
        was_training = model.training
        model.eval()  # the LM head's loss path depends on the training flag
        try:
            with accelerator.autocast():
                documents = [
                    (task.name, index, sample)
                    for task in self.tasks
                    for index, sample in score_share(
                        module, self.encoder, task, rank, world, batch_size=self.batch_size
                    )
                ]
                bits = [
                    (source, text_bits(module, self.encoder, texts[rank::world], batch_size=self.batch_size))
                    for source, texts in self.texts.items()
                ]
        finally:
            model.train(was_training)
        if world > 1:
            documents, bits = gather_object(documents), gather_object(bits)
        return self._figures(documents, bits)

    def _figures(self, documents: list[tuple], bits: list[tuple[str, SourceBits]]) -> dict[str, float]:
        """The record's figures from every rank's per-document scores and per-source bits."""
        record: dict[str, Any] = {}
        figures: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            # In the task's order, whichever rank scored each document: the figures are those of one process.
            scored = sorted(
                ((index, sample) for name, index, sample in documents if name == task.name),
                key=lambda item: item[0],
            )
            figures[task.name] = sample_figures(task, [sample for _, sample in scored])
            for key in ("accuracy", "centered", "bpb"):
                if key in figures[task.name]:
                    record[f"eval/{task.name}/{key}"] = figures[task.name][key]
        core = core_score(figures, CORE)
        if core is not None:
            record["eval/core"] = core
        for source in self.texts:
            total = SourceBits()
            for name, share in bits:
                if name == source:
                    total.bytes, total.bits = total.bytes + share.bytes, total.bits + share.bits
            if total.bpb is not None:
                record[f"eval/bpb/{source}"] = total.bpb
        return record


def _parameters_sharded(accelerator: Accelerator) -> bool:
    """Whether each rank holds only a shard of the weights (DeepSpeed ZeRO-3, FSDP): forwards gather them
    collectively, so every rank must run the same forwards."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        return zero.get("stage") == 3
    return False


class Sampler:
    """Greedy continuations of fixed prompts every `every` steps, so a run's progress can be read.

    `encode` turns a prompt into the ids the model continues (raw text for a pretrained model, a chat
    turn for a chat model); generation stops at `stop_token_ids` or after `max_new_tokens`.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        *,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        stop_token_ids: Sequence[int],
        every: int,
        max_new_tokens: int,
    ) -> None:
        self.prompts = list(prompts)
        self.encode, self.decode = encode, decode
        self.stop_token_ids = list(stop_token_ids)
        self.every = every if self.prompts else 0
        self.max_new_tokens = max_new_tokens

    def should_run(self, step: int, *, final: bool = False) -> bool:
        """Due every `every` steps and at the end (when sampling is on)."""
        return self.every > 0 and (final or step % self.every == 0)

    @torch.no_grad()
    def run(self, model: nn.Module, accelerator: Accelerator) -> dict[str, str]:
        """{prompt: continuation}. All ranks call it (ZeRO-3 gathers weights collectively)."""
        was_training = model.training
        model.eval()
        module = accelerator.unwrap_model(model)
        out: dict[str, str] = {}
        # Sampling must not consume the training RNG streams, or a resumed run would diverge.
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), accelerator.autocast():
            for prompt in self.prompts:
                new_ids = generate(
                    module,
                    torch.tensor(self.encode(prompt), device=accelerator.device),
                    max_new_tokens=self.max_new_tokens,
                    temperature=0.0,
                    top_k=None,
                    top_p=None,
                    repetition_penalty=1.0,
                    stop_token_ids=self.stop_token_ids,
                    seed=0,
                )
                out[prompt] = self.decode(new_ids)
        model.train(was_training)
        return out
