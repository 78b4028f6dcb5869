"""Preference tuning's objective: DPO and its variants, on sums of answer-token log-probabilities.

For a prompt x with a chosen answer y_w and a rejected one y_l, let

    log π(y | x)  = the sum of the policy's log-probabilities of the answer's tokens (its <|end|> included)
    log π0(y | x) = the same under the reference (the frozen starting policy)
    h = [log π(y_w|x) - log π0(y_w|x)] - [log π(y_l|x) - log π0(y_l|x)]     (the log-ratio margin)

Each loss below is written once, beside its closed form; `preference_loss` picks one by config. The
rewards that are logged are the implicit ones, r(y) = β [log π(y|x) - log π0(y|x)] (SimPO: β times the
mean log-probability per answer token), so reward accuracy is how often r(y_w) > r(y_l) and the margin
is the mean of r(y_w) - r(y_l).

Which loss when (docs/preference_tuning.md has more):
- dpo: the default; β (0.1) is how far the policy may move from the reference.
- cdpo: DPO with label smoothing ε, for pairs whose labels are noisy (a fraction ε assumed flipped): the
  loss no longer drives the margin to infinity.
- ipo: a squared loss that holds the margin at 1/(2β) instead of pushing it without bound: it resists
  overfitting on small or deterministic preference data.
- simpo: no reference model at all (half the memory of a frozen copy, no reference pass) and length-
  normalised, with a target margin γ; needs a larger β (2.0 to 2.5) and a smaller learning rate.
- sft_weight > 0 (RPO) adds the chosen answers' negative log-likelihood per token: DPO can lower the
  chosen answer's probability while it raises the margin; this term keeps it up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat
from torch import nn

from training.objectives import Batch, Objective, ObjectiveOutput, bits_per_byte


@dataclasses.dataclass
class PreferenceLossConfig:
    """The preference loss (the `loss:` section)."""

    type: Literal["dpo", "cdpo", "ipo", "simpo"] = "dpo"
    """dpo (sigmoid), cdpo (DPO with label smoothing), ipo, or simpo (no reference model)."""
    beta: PositiveFloat = 0.1
    """How strongly the log-ratio margin is scored: DPO's KL strength (0.1; 0.01-0.5 are common), IPO's
    target margin 1/(2 beta), SimPO's scale (2.0-2.5)."""
    label_smoothing: ClosedUnitInterval = 0.1
    """cdpo only: the fraction of pairs assumed mislabelled (0 < e < 0.5)."""
    simpo_gamma: NonNegativeFloat = 0.5
    """simpo only: the target reward margin gamma."""
    sft_weight: NonNegativeFloat = 0.0
    """RPO: weight of the chosen answers' negative log-likelihood per token added to the loss (0 = off;
    1.0 in the RPO paper)."""

    def __post_init__(self) -> None:
        if self.type == "cdpo" and not 0 < self.label_smoothing < 0.5:
            raise ValueError(f"cdpo needs 0 < label_smoothing < 0.5, got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.type != "simpo"


# ---------------------------------------------------------------------------------------------------
# The losses, per pair (a mean over pairs is the objective's loss)


def dpo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023):  L = -log σ(β h).  At h = 0 (policy = reference) L = ln 2."""
    return -F.logsigmoid(beta * margin)


def cdpo_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023):  L = -(1 - ε) log σ(β h) - ε log σ(-β h).  ln 2 at h = 0; its
    minimum is at the finite margin β h = ln((1 - ε) / ε)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
        -beta * margin
    )


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023):  L = (h - 1/(2β))².  1/(4β²) at h = 0; zero at the target margin 1/(2β)."""
    return (margin - 1 / (2 * beta)) ** 2


def simpo_loss(
    chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free and length-normalised, with log π averaged over each
    answer's tokens:  L = -log σ(β (mean log π(y_w|x) - mean log π(y_l|x)) - γ)."""
    return -F.logsigmoid(beta * (chosen_mean_logp - rejected_mean_logp) - gamma)


@dataclasses.dataclass
class PairLogps:
    """Per pair: summed answer log-probabilities and answer token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def preference_loss(
    config: PreferenceLossConfig, policy: PairLogps, reference: PairLogps | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) of the configured loss, without the SFT term."""
    if config.type == "simpo":
        chosen_mean = policy.chosen / policy.chosen_tokens
        rejected_mean = policy.rejected / policy.rejected_tokens
        loss = simpo_loss(chosen_mean, rejected_mean, config.beta, config.simpo_gamma)
        return loss, config.beta * chosen_mean.detach(), config.beta * rejected_mean.detach()
    assert reference is not None, "this loss needs the reference's log-probabilities"
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    margin = chosen_ratio - rejected_ratio
    if config.type == "dpo":
        loss = dpo_loss(margin, config.beta)
    elif config.type == "cdpo":
        loss = cdpo_loss(margin, config.beta, config.label_smoothing)
    else:
        loss = ipo_loss(margin, config.beta)
    return loss, config.beta * chosen_ratio.detach(), config.beta * rejected_ratio.detach()


def loss_at_reference(config: PreferenceLossConfig) -> float:
    """The loss when the policy equals the reference (h = 0): what the first step must show."""
    if config.type == "ipo":
        return 1 / (4 * config.beta**2)
    return math.log(2)


# ---------------------------------------------------------------------------------------------------
# Log-probabilities of a batch of pairs


def answer_logps(model: nn.Module, batch: Batch) -> PairLogps:
    """The summed log-probabilities of every answer in a preference batch (dataset/preference_stream.py's
    PreferenceLoader: sequence_ids say which answer each label belongs to), from one forward pass."""
    out = model(
        input_ids=batch["input_ids"],
        labels=batch["labels"],
        position_ids=batch["position_ids"],
        return_token_logprobs=True,
    )
    token_logps = out.token_logprobs  # at t: log p(labels[t + 1])
    sequence = F.pad(batch["sequence_ids"][:, 1:], (0, 1), value=-1)  # aligned with the targets
    n = 2 * batch["pair_ids"].numel()
    keep = sequence >= 0
    index = sequence[keep]
    sums = torch.zeros(n, dtype=torch.float32, device=token_logps.device).index_add(
        0, index, token_logps[keep]
    )
    counts = torch.zeros(n, dtype=torch.float32, device=token_logps.device).index_add(
        0, index, torch.ones_like(index, dtype=torch.float32)
    )
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


class ReferenceMismatchError(RuntimeError):
    """At the first step the policy and the reference disagree: they should be the same model."""


class PreferenceObjective(Objective):
    """The preference loss as the shared loop's objective: a mean over pairs.

    The reference's log-probabilities come from, by `reference`:
    - "copy": `frozen["reference"]`, a frozen copy of the starting policy that the loop prepares beside it;
    - "adapter": the policy itself with its LoRA adapters disabled (the same weights minus the adapters);
    - "cached": `cache`, a (pairs, 2) tensor of [chosen, rejected] sums indexed by the batch's pair_ids,
      computed once before training (`compute_reference_logps`);
    - None: no reference (SimPO).

    Metrics (means over pairs): reward_accuracy, reward_margin, rewards_chosen, rewards_rejected,
    logps_chosen, logps_rejected (policy sums), and for bits per byte of the chosen answers under the
    policy, nll_chosen and bytes_chosen (per pair; their ratio is exact over the batch).

    `check_first_call`: at its first call (a fresh run's first step) the rewards must be 0 and the loss its
    value at the reference; otherwise ReferenceMismatchError names the likely causes.
    """

    def __init__(
        self,
        config: PreferenceLossConfig,
        reference: str | None,
        *,
        cache: torch.Tensor | None = None,
        token_bytes: torch.Tensor | None = None,
        check_first_call: bool = False,
        tolerance: float = 1e-3,
    ):
        if reference not in (None, "copy", "adapter", "cached"):
            raise ValueError(f"unknown reference mode {reference!r}")
        if reference == "cached" and cache is None:
            raise ValueError("the cached reference needs its cache")
        self.config = config
        self.reference = reference
        self.cache = cache
        self.token_bytes = token_bytes
        self.check_pending = check_first_call and reference is not None
        self.tolerance = tolerance

    def count(self, batch: Batch) -> int:
        return batch["pair_ids"].numel()

    def shape(self, batch: Batch) -> tuple[int, int]:
        rows, length = batch["input_ids"].shape
        return rows, length

    def reference_logps(self, model: nn.Module, batch: Batch, frozen: Mapping[str, nn.Module]) -> PairLogps:
        if self.reference == "cached":
            assert self.cache is not None
            cached = self.cache.to(batch["pair_ids"].device)[batch["pair_ids"]]
            return PairLogps(cached[:, 0], cached[:, 1], torch.empty(0), torch.empty(0))
        with torch.no_grad():
            if self.reference == "copy":
                return answer_logps(frozen["reference"], batch)
            peft_model = _find_peft_model(model)
            with peft_model.disable_adapter():
                return answer_logps(peft_model, batch)

    def __call__(self, model: nn.Module, batch: Batch, frozen: Mapping[str, nn.Module]) -> ObjectiveOutput:
        reference = None if self.reference is None else self.reference_logps(model, batch, frozen)
        policy = answer_logps(model, batch)
        loss, chosen_reward, rejected_reward = preference_loss(self.config, policy, reference)
        if self.check_pending:
            self.check_pending = False
            self._check_at_reference(loss.detach(), chosen_reward, rejected_reward)
        nll_chosen = -policy.chosen
        if self.config.sft_weight:
            loss = loss + self.config.sft_weight * nll_chosen / policy.chosen_tokens
        metrics = {
            "reward_accuracy": (chosen_reward > rejected_reward).float(),
            "reward_margin": chosen_reward - rejected_reward,
            "rewards_chosen": chosen_reward,
            "rewards_rejected": rejected_reward,
            "logps_chosen": policy.chosen.detach(),
            "logps_rejected": policy.rejected.detach(),
            "nll_chosen": nll_chosen.detach(),
        }
        if self.token_bytes is not None:
            metrics["bytes_chosen"] = self._chosen_bytes(batch)
        return ObjectiveOutput(loss.mean(), {name: value.mean() for name, value in metrics.items()})

    def _chosen_bytes(self, batch: Batch) -> torch.Tensor:
        assert self.token_bytes is not None
        self.token_bytes = self.token_bytes.to(batch["labels"].device)
        labels, sequence = batch["labels"], batch["sequence_ids"]
        chosen = (sequence >= 0) & (sequence % 2 == 0)
        per_pair = torch.zeros(batch["pair_ids"].numel(), dtype=torch.float32, device=labels.device)
        return per_pair.index_add(0, sequence[chosen] // 2, self.token_bytes[labels[chosen]].float())

    def report(self, means: Mapping[str, float]) -> dict[str, float]:
        if "bytes_chosen" not in means:
            return {}
        return {"bpb_chosen": bits_per_byte(means["nll_chosen"], means["bytes_chosen"])}

    def _check_at_reference(self, loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        expected = loss_at_reference(self.config)
        worst = (
            torch.stack([(loss - expected).abs().max(), chosen.abs().max(), rejected.abs().max()])
            .max()
            .float()
            .reshape(1)
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank stops, or none
        if worst.item() > self.tolerance:
            raise ReferenceMismatchError(
                f"at step 0 the policy should equal the reference (loss {expected:.4f}, every reward 0), but "
                f"the loss is {loss.mean().item():.4f} and losses or rewards are off by up to {worst.item():.4g} on some rank. Likely "
                "causes: dropout or another train-mode difference between policy and reference; different "
                "dtypes or precision (a reference cached in another precision, or loaded in another dtype); "
                "a mask or positions that differ between the two passes; a reference that is not the --init "
                "model (a stale cache)."
            )


def _find_peft_model(model: nn.Module) -> Any:
    """The peft model inside whatever wraps it (DDP, DeepSpeed: `.module`)."""
    while not hasattr(model, "disable_adapter"):
        inner = getattr(model, "module", None)
        if inner is None:
            raise ValueError("the adapter reference needs a LoRA model (lora.rank > 0)")
        model = inner
    return model


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module, batches: Iterable[Batch], num_pairs: int, *, device: torch.device, autocast: Any
) -> torch.Tensor:
    """[chosen, rejected] summed log-probabilities of every pair the batches hold, as a (num_pairs, 2)
    tensor indexed by pair id (NaN for pairs not seen here), computed with `model` in eval mode under
    `autocast` (the run's precision context)."""
    was_training = model.training
    model.eval()
    table = torch.full((num_pairs, 2), float("nan"), dtype=torch.float32)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logps = answer_logps(model, batch)
            ids = batch["pair_ids"].cpu()
            table[ids, 0] = logps.chosen.float().cpu()
            table[ids, 1] = logps.rejected.float().cpu()
    finally:
        model.train(was_training)
    return table
