"""LoRA fine-tuning through peft: low-rank adapters beside frozen weights (Hu et al. 2021).

Each targeted linear layer W (the attention and MLP projections by default) gets two small matrices,
A (rank x in) and B (out x rank, initialised to zero, so training starts from the model as it is); the
layer computes W x + (alpha / rank) B A x, and only A and B train. peft does the wrapping; our Llama keeps
the module names of transformers' LlamaForCausalLM, so the adapters carry the names a Hugging Face Llama
has and an adapter trained here loads onto the exported base in stock transformers + peft.

What the stages get here:

- `add_lora(model, config)`: the model wrapped in a `peft.PeftModel`; `with model.disable_adapter():`
  gives the frozen base model back for a forward pass (preference tuning's reference, with no second copy);
- `checkpoint_trainable_only(accelerator)`: checkpoints hold only the adapters (the frozen base, 27 GB in
  fp32 for 7B, is rebuilt from --init at every start), and resume loads them back, exactly;
- `peft_model_from_state(...)`: a PeftModel from a full state dict (the export: merge the adapters into the
  weights so the exported folder is a plain Llama, and save the adapter alone beside it);
- `merge_adapter_tensors(...)`: a base model with a saved adapter merged in (--init from a LoRA checkpoint).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from accelerate import Accelerator
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveFloat
from safetensors.torch import load_file
from torch import nn

from common.files import atomic_dir
from models.llama import Llama, ModelConfig, RunOptions

PEFT_PREFIX = "base_model.model."
LlamaLinear = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_LINEAR_LAYERS = list(get_args(LlamaLinear))


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters (the `lora:` section); rank 0 trains every weight instead (full fine-tuning)."""

    rank: NonNegativeInt = 0
    """Rank of the adapters; 0 = full fine-tuning (no adapters)."""
    alpha: PositiveFloat = 16.0
    """Scale of the adapters' output: alpha / rank."""
    dropout: ClosedUnitInterval = 0.05
    """Dropout on the adapters' input during training."""
    target_modules: list[LlamaLinear] = dataclasses.field(default_factory=lambda: list(LLAMA_LINEAR_LAYERS))
    """Linear layers that get adapters (names as in transformers' Llama): q_proj k_proj v_proj o_proj
    gate_proj up_proj down_proj."""

    def __post_init__(self) -> None:
        if self.rank and not self.target_modules:
            raise ValueError("target_modules is empty: no layer would get an adapter")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def peft_config(self) -> Any:
        import peft

        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


def add_lora(model: Llama, config: LoraConfig) -> nn.Module:
    """`model` with LoRA adapters (a peft.PeftModel); every other weight is frozen."""
    try:
        import peft
    except ImportError:  # pragma: no cover - it is in requirements.txt
        raise ImportError("LoRA needs peft: pip install peft") from None
    # No task type: the plain PeftModel passes forward's keyword arguments through to our Llama unchanged.
    return peft.get_peft_model(model, config.peft_config())


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def checkpoint_trainable_only(accelerator: Accelerator) -> None:
    """Make the accelerator's checkpoints hold only trainable tensors, and restore them on resume.

    accelerate writes each model's state dict (model.safetensors); the save hook drops the frozen tensors
    from it, and the load hook loads what was saved into the model and takes the model off accelerate's
    list (accelerate would load it strictly and miss the frozen weights). DeepSpeed and FSDP write their own
    checkpoint formats, whole; these hooks leave them alone.
    """

    def save(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], _output_dir: str) -> None:
        for model, state in zip(models, weights):
            keep = trainable_names(model)
            for name in [name for name in state if name not in keep]:
                del state[name]

    def load(models: list[nn.Module], input_dir: str) -> None:
        for index, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            tensors = load_file(path)
            expected = trainable_names(model)
            if set(tensors) != expected:
                missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
                raise ValueError(
                    f"{path}: the saved adapters do not match this run's (missing {missing[:4]}, "
                    f"unexpected {extra[:4]}); resume with the same lora settings"
                )
            model.load_state_dict(tensors, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def peft_model_from_state(
    model_config: ModelConfig,
    state: dict[str, torch.Tensor],
    config: LoraConfig,
    *,
    options: RunOptions | None = None,
) -> nn.Module:
    """A PeftModel holding a full PeftModel state dict (base weights and adapters), e.g. the one the
    training loop gathers for the export. The base tensors are used as they are (no copy)."""
    base = {
        name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): tensor
        for name, tensor in state.items()
        if ".lora_" not in name
    }
    peft_model = add_lora(Llama.from_state_dict(model_config, base, options=options), config)
    peft_model.load_state_dict(state)
    return peft_model


def save_adapter(peft_model: Any, out_dir: str | Path, base_model: str) -> Path:
    """The adapter alone, in peft's format (adapter_config.json + adapter_model.safetensors), atomically;
    `base_model` is recorded as the model it applies to."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_model
        peft_model.save_pretrained(tmp, save_embedding_layers=False)  # adapters only ever on linear layers
    return out_dir


def merge_adapter_tensors(base: Llama, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> Llama:
    """`base` with saved adapter tensors (names as a PeftModel's state dict) merged into its weights."""
    peft_model = add_lora(base, config)
    adapters = {name: t for name, t in tensors.items() if ".lora_" in name}
    result = peft_model.load_state_dict(adapters, strict=False)
    if result.unexpected_keys or not adapters:
        raise ValueError(
            f"the adapter tensors do not fit the model (unexpected {result.unexpected_keys[:4]})"
        )
    return peft_model.merge_and_unload()
