"""The model a fine-tuning stage starts from (`--init DIR`), rebuilt from what the folder holds.

DIR may be

- any Hugging Face Llama folder (config.json + safetensors or pytorch_model.bin): ours, exported by a
  stage, or another's (models/hf.py `load_hf`);
- a checkpoint of ours, `step-N/` with the run's `config.yaml`: its `model:` section rebuilds the model and
  the weights come from accelerate's `model.safetensors` (single device, DDP) or DeepSpeed's ZeRO folder.
  A LoRA checkpoint holds only its adapters: they are merged into the model its own `init` names;
- a run folder (`train.output_dir`): its latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from common.run_folder import checkpoint_folder
from models.hf import load_hf, read_hf_tensors
from models.llama import Llama, ModelConfig, RunOptions
from training.lora import LoraConfig, merge_adapter_tensors, peft_model_from_state


def load_initial_model(path: str | Path, *, options: RunOptions | None = None) -> Llama:
    """The model in `path` (module docstring), in float32 on the CPU, running with `options`."""
    folder = checkpoint_folder(path)
    if (folder / "config.json").is_file():
        return load_hf(folder, options=options, dtype=torch.float32)
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(
            f"{path}: neither a Hugging Face model folder (config.json) nor a checkpoint of ours (config.yaml)"
        )
    saved = yaml.safe_load(saved_path.read_text()) or {}
    if not saved.get("model"):
        raise ValueError(f"{saved_path}: no model section to rebuild the model from")
    config = ModelConfig.from_dict(saved["model"])
    tensors = _checkpoint_tensors(folder)
    lora = LoraConfig(**(saved.get("lora") or {}))
    if lora.enabled and not any(".base_layer." in name for name in tensors):
        if not saved.get("init"):
            raise ValueError(f"{saved_path}: a LoRA checkpoint without the `init` its adapters apply to")
        base = load_initial_model(saved["init"], options=options)
        return merge_adapter_tensors(base, lora, tensors)
    if lora.enabled:  # a whole PeftModel state (DeepSpeed saves every tensor)
        return peft_model_from_state(config, tensors, lora, options=options).merge_and_unload()
    return Llama.from_state_dict(config, tensors, options=options, dtype=torch.float32)


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The model tensors of an accelerate checkpoint, with DDP's `module.` prefix removed."""
    if (folder / "model.safetensors").is_file():
        tensors = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file() or (folder / "model.safetensors.index.json").is_file():
        tensors = read_hf_tensors(folder)
    elif (folder / "pytorch_model").is_dir():  # DeepSpeed ZeRO: gather the partitions in fp32
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tensors = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")
    elif any(folder.glob("pytorch_model_fsdp*")):
        raise ValueError(
            f"{folder}: an FSDP sharded checkpoint; merge it first (`accelerate merge-weights "
            f"{folder}/pytorch_model_fsdp_0 OUT`) or start from the run's Hugging Face export (hf/)"
        )
    else:
        raise FileNotFoundError(f"{folder}: no model weights (model.safetensors, pytorch_model/)")
    return {_strip(name): tensor for name, tensor in tensors.items()}


def _strip(name: str) -> str:
    return name.removeprefix("module.")
