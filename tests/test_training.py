"""The shared training loop: configs, schedule, non-finite steps, checkpoints, exact resume, multi-process.

End-to-end runs go through `pretrain_llama.py` in a subprocess on real text from ../shared/corpus (small
shards cut from it and a tokenizer trained here), fp32 on CPU so that resumed runs can be compared
bit for bit. The multi-process checks (gloo DDP, DeepSpeed ZeRO-1) start real processes.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import orjson
import pytest
import torch
import yaml
import zstandard
from safetensors.torch import load_file

from common.config import load_config
from data.shard_io import iter_shard_records
from evaluation.tasks import CORE
from models.hf import NAME_KEY
from models.llama import Llama, ModelConfig
from tests.helpers.eval_tasks import colour_documents, write_task
from tests.helpers.training import (
    PYTHON,
    REPO,
    AgreementWithReference,
    RowStream,
    TinyRun,
    check_report_and_card,
    env,
    pretrain,
    run_config,
    tiny_run,
)
from training import faults
from training.checkpoint import Checkpointer, CheckpointError
from training.config import OptimConfig, TrainConfig
from training.distributed import build_accelerator
from training.loop import NonFiniteLossError, train
from training.objectives import CausalLMObjective, ObjectiveOutput
from training.optim import build_optimizer, lr_factor, param_groups
from training.report import run_name

# ---------------------------------------------------------------------------------------------------
# A run's output (the runs: tests/helpers/training.py, on the real_data fixture)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(step_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------------------
# Configs


def test_typo_in_a_run_config_is_a_clean_cli_error(real_data, tmp_path):
    config = run_config(real_data, tmp_path / "out")
    result = pretrain(config, "--train.checkpoint_evry", "3")
    assert result.returncode == 2
    assert "unknown option --train.checkpoint_evry (did you mean 'checkpoint_every'?)" in result.stderr
    assert "max_steps" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_instructions(
    monkeypatch, amx, avx512_bf16, expected
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert TrainConfig(precision="auto").precision == expected
    assert TrainConfig(precision="fp32").precision == "fp32"  # an explicit choice is kept
    from pretrain_llama import PretrainConfig

    assert load_config(PretrainConfig, {"train": {"precision": "auto"}}).train.precision == expected


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_shard_mid_run_stops_with_its_file_and_line(real_data, tmp_path, workers):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = list(iter_shard_records(real_data["shards"] / "part-pile-00000.jsonl.zst"))[:8]
    lines = [orjson.dumps(r) for r in good[:5]] + [b'{"text": "cut'] + [orjson.dumps(r) for r in good[5:]]
    bad = shards / "part-pile-00000.jsonl.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    config = run_config(
        real_data,
        tmp_path / "out",
        data={"shards": [str(shards / "*.jsonl.zst")], "num_workers": workers, "validation_fraction": 0},
        train={"eval_every": 0},
    )
    result = pretrain(config)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"a shard cannot be read: {bad}:6: malformed JSON" in result.stderr
    assert "--resume auto" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# Optimizer and schedule


def test_lr_schedule_warmup_then_cosine_to_the_minimum():
    config = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, config, 110) == pytest.approx(0.1)
    assert lr_factor(9, config, 110) == pytest.approx(1.0)
    assert lr_factor(10, config, 110) == pytest.approx(1.0)
    # Halfway through the decay the cosine is at its midpoint: min + (1 - min) / 2.
    assert lr_factor(60, config, 110) == pytest.approx(0.55)
    assert lr_factor(110, config, 110) == pytest.approx(0.1)
    assert lr_factor(500, config, 110) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = Llama(ModelConfig.from_preset("tiny", vocab_size=100, dim=32, n_layers=1, n_heads=2))
    model.extra = torch.nn.Linear(4, 4, bias=True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in no_decay_names  # tied with lm_head: one tensor, no decay
    assert "model.norm.weight" in no_decay_names and "extra.bias" in no_decay_names
    assert all("norm" in n or n.endswith("bias") or "embed" in n for n in no_decay_names)
    assert {names[id(p)] for p in decay["params"]} >= {
        "model.layers.0.self_attn.q_proj.weight",
        "extra.weight",
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert build_optimizer(model, OptimConfig()).defaults["fused"] is True  # torch has a fused CPU kernel
    assert build_optimizer(model, OptimConfig(fused=False)).defaults["fused"] is None


# ---------------------------------------------------------------------------------------------------
# In-process loop checks on a synthetic learnable stream


def run_in_process(config: TinyRun):
    accelerator = build_accelerator(config.train)
    torch.manual_seed(0)
    model = Llama(config.model)
    return train(model, RowStream(), CausalLMObjective(), config=config, accelerator=accelerator), model


def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path, monkeypatch):
    clean, clean_model = run_in_process(tiny_run(tmp_path / "a", max_steps=2))
    monkeypatch.setenv(faults.NAN_LOSS_STEPS_ENV, "3")
    skipped, skipped_model = run_in_process(tiny_run(tmp_path / "b", max_steps=3))
    assert skipped.nonfinite_steps == 1 and clean.nonfinite_steps == 0
    # Step 3 applied no update: the weights are those after step 2.
    for (name, a), b in zip(clean_model.state_dict().items(), skipped_model.state_dict().values()):
        assert torch.equal(a, b), name
    record = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 3 and record["loss"] is None and record["nonfinite_steps"] == 1
    assert record["rows_read"] == {"all": 12}  # the data's counters hook, 3 batches of 4 rows


def test_consecutive_nonfinite_losses_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.NAN_LOSS_STEPS_ENV, "2,3,4")
    config = tiny_run(tmp_path / "c", max_steps=10, max_nonfinite_steps=3)
    with pytest.raises(
        NonFiniteLossError, match=r"3 consecutive steps with a non-finite loss or gradient \(steps 2-4\)"
    ):
        run_in_process(config)


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose backward pass overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_gradient_behind_a_finite_loss_skips_the_step(tmp_path):
    calls = 0

    class OverflowingAtStep3(CausalLMObjective):
        def __call__(self, model, batch, frozen):
            nonlocal calls
            calls += 1
            loss = model(**batch).loss
            return ObjectiveOutput(_InfGradient.apply(loss) if calls == 3 else loss)

    _, clean_model = run_in_process(tiny_run(tmp_path / "a", max_steps=2))
    config = tiny_run(tmp_path / "b", max_steps=3)
    accelerator = build_accelerator(config.train)
    torch.manual_seed(0)
    model = Llama(config.model)
    result = train(model, RowStream(), OverflowingAtStep3(), config=config, accelerator=accelerator)
    assert result.nonfinite_steps == 1
    for (name, a), b in zip(clean_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # step 3 applied nothing (no NaN weights either)


def test_a_frozen_model_is_prepared_beside_the_policy_and_never_trained(tmp_path):
    config = tiny_run(tmp_path / "frozen", max_steps=4, checkpoint_every=2, eval_every=2)
    accelerator = build_accelerator(config.train)
    torch.manual_seed(0)
    model = Llama(config.model)
    reference = Llama(config.model)
    reference.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    val = [b for b, _ in zip(RowStream(), range(2))]
    objective = AgreementWithReference()
    result = train(
        model, RowStream(), objective, config=config, accelerator=accelerator, val_data=val,
        frozen={"reference": reference},
    )  # fmt: skip
    assert result.step == 4
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # frozen: the optimizer never saw it
    records = [json.loads(x) for x in (tmp_path / "frozen" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["drift_from_reference"] == pytest.approx(0.0, abs=1e-5)  # step 1: policy == reference
    assert records[-1]["drift_from_reference"] > 0  # the policy moved away from the reference
    assert "val_drift_from_reference" in records[-1] and records[-1]["val_ppl"] > 1
    # Only the policy's state is checkpointed: the reference is rebuilt from its source at every start.
    saved = sorted(p.name for p in (tmp_path / "frozen" / "step-4").glob("model*.safetensors"))
    assert saved == ["model.safetensors"]


NETWORK_AUDIT = textwrap.dedent(
    """
    import runpy, socket, sys

    def report_network(event, args):
        if event == "socket.getaddrinfo" or (event == "socket.connect" and args[0].family != socket.AF_UNIX):
            sys.stderr.write(f"NETWORK {event} {args[1:]!r}\\n")

    sys.addaudithook(report_network)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def test_wandb_offline_without_an_api_key_never_touches_the_network(real_data, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "wandb_run"
    config = run_config(
        real_data, out, train={"max_steps": 3, "eval_every": 0}, logging={"wandb_project": "open-llama-test"}
    )
    script = tmp_path / "audit.py"
    script.write_text(NETWORK_AUDIT)
    environment = env(HOME=str(tmp_path / "home"))  # no ~/.netrc login
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        environment.pop(var, None)
    cmd = [PYTHON, str(script), str(REPO / "pretrain_llama.py"), "--config", str(config)]
    result = subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NETWORK" not in result.stderr, [x for x in result.stderr.splitlines() if "NETWORK" in x]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run is there, to `wandb sync` later


def test_no_checkpoint_of_nonfinite_weights(tmp_path):
    config = tiny_run(tmp_path / "d", max_steps=1)
    accelerator = build_accelerator(config.train)
    model = accelerator.prepare(Llama(config.model))
    checkpointer = Checkpointer(accelerator, tmp_path / "d", every=1, keep_last=0, run_config=config)
    checkpointer.save(1, {}, model)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        checkpointer.save(2, {}, model)
    assert [p.name for p in checkpointer.step_dirs()] == ["step-1"]
    assert not list((tmp_path / "d").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# End to end on real text: loss falls, kill -9 and resume, kill during a checkpoint write


def eval_section(real_data) -> dict:
    """Downstream evaluation every 30 steps: CORE's ten task names (synthetic files) and the bits per byte of
    the shards' held-out documents."""
    tasks = real_data["root"] / "oe_eval_tasks"
    if not tasks.exists():
        for seed, name in enumerate(CORE):
            write_task(tasks, name, "rc_5shot", colour_documents(4, seed), "acc_per_char")
    shards = str(real_data["shards"] / "*.jsonl.zst")
    return {
        "tasks": ["core"],
        "every": 30,
        "task_dir": str(tasks),
        "shards": [shards],
        "validation_fraction": 0.05,
    }


def eval_figures(out: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in records if "eval/core" in r
    }


@pytest.fixture(scope="module")
def reference_run(real_data):
    """An uninterrupted 60-step run, the reference for the resumed ones."""
    out = real_data["root"] / "reference"
    result = pretrain(run_config(real_data, out, eval=eval_section(real_data)))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_loss_falls_on_real_text_and_the_run_is_complete(reference_run):
    loss = losses(reference_run)
    first, last = loss[1], sum(loss[s] for s in range(56, 61)) / 5
    assert first == pytest.approx(math.log(512), abs=0.3)  # an untrained model is near-uniform
    assert last < first - 1.0, (first, last)
    assert (reference_run / "latest").read_text().strip() == "step-60"
    assert sorted(p.name for p in reference_run.glob("step-*")) == ["step-50", "step-60"]  # keep_last 2
    assert (reference_run / "loss_curve.png").stat().st_size > 1000
    records = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [30, 60] and val[1]["val_loss"] < val[0]["val_loss"]
    assert val[1]["val_ppl"] == pytest.approx(math.exp(val[1]["val_loss"]))
    # Downstream scores beside them (eval.every 30 and at the end), and a second panel in the loss curve.
    downstream = eval_figures(reference_run)
    assert list(downstream) == [30, 60]
    for figures in downstream.values():
        assert {"eval/core", "eval/arc_easy/accuracy", "eval/arc_easy/centered", "eval/bpb/pile"} <= set(
            figures
        )
    assert downstream[60]["eval/bpb/pile"] < downstream[30]["eval/bpb/pile"]
    from matplotlib.image import imread

    assert imread(reference_run / "loss_curve.png").shape[0] == 2 * 4 * 110  # two rows of panels
    # Tokens per source (the training data category distribution): every row's tokens counted once.
    per_source = records[-1]["tokens_per_source"]
    assert sum(per_source.values()) == records[-1]["tokens_seen"] == 60 * 8 * 64
    assert all(n > 0 for n in per_source.values()), per_source
    # The saved config rebuilds the model, and the Hugging Face export matches the last checkpoint.
    from pretrain_llama import PretrainConfig

    saved = load_config(PretrainConfig, reference_run / "step-60" / "config.yaml")
    assert saved.model.vocab_size == 512 and saved.model.dim == 64
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(reference_run / "hf")
    ours = Llama(saved.model)
    ours.load_state_dict(weights(reference_run / "step-60"), strict=False)
    ours.tie_weights()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    # The report card and the model card, with the figures of metrics.jsonl.
    check_report_and_card(reference_run, name=run_name(reference_run))
    report = (reference_run / "report.md").read_text()
    assert "## Data" in report and "- tokens per source (trained): " in report
    assert "- vocabulary: 512 " in report and "bytes per token, " in report


def test_kill_9_after_a_checkpoint_then_resume_auto_is_exact(real_data, reference_run, tmp_path):
    out = tmp_path / "killed"
    config = run_config(real_data, out, eval=eval_section(real_data))
    cmd = [PYTHON, str(REPO / "pretrain_llama.py"), "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "latest").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = int((out / "latest").read_text().strip().split("-")[1])
    assert killed_at < 60

    result = pretrain(config, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {killed_at})" in result.stderr  # it did resume, from the checkpoint
    reference, resumed = losses(reference_run), losses(out)
    assert resumed == reference  # every step, before and after the kill, bit for bit
    assert eval_figures(out) == eval_figures(reference_run)  # the downstream scores too, at the same steps
    for name, tensor in weights(reference_run / "step-60").items():
        assert torch.equal(tensor, weights(out / "step-60")[name]), name


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(real_data, reference_run, tmp_path):
    out = tmp_path / "torn"
    config = run_config(real_data, out)
    result = pretrain(config, **{faults.KILL_DURING_CHECKPOINT_ENV: "20"})
    assert result.returncode == -signal.SIGKILL
    assert (out / "latest").read_text().strip() == "step-10"
    assert (out / "step-20.tmp").is_dir() and not (out / "step-20").exists()

    result = pretrain(config, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removing" in result.stderr and "(step 10)" in result.stderr
    assert not list(out.glob("*.tmp"))
    assert losses(out) == losses(reference_run)


def test_fresh_start_refuses_to_overwrite_a_run(real_data, reference_run):
    result = pretrain(run_config(real_data, reference_run))
    assert result.returncode == 1 and "pass --resume auto" in result.stderr


def test_continued_pretraining_from_an_export_or_a_run_folder(real_data, reference_run, tmp_path):
    """--init DIR continues the reference run's model, its shape and tokenizer taken from DIR (the config
    has no model section and no data.tokenizer): the first loss is where the reference run ended."""
    ended = sum(losses(reference_run)[s] for s in range(56, 61)) / 5
    first_losses = {}
    for name, init in (("from_hf", reference_run / "hf"), ("from_run", reference_run)):
        out = tmp_path / name
        config = run_config(real_data, out, data={"tokenizer": ""}, train={"max_steps": 3, "eval_every": 0})
        values = yaml.safe_load(config.read_text())
        del values["model"]
        config.write_text(yaml.safe_dump(values))
        result = pretrain(config, "--init", str(init))
        assert result.returncode == 0, result.stderr[-3000:]
        first_losses[name] = losses(out)[1]
        assert first_losses[name] == pytest.approx(ended, abs=0.5)  # not ln(512) = 6.2: a trained model
        exported = json.loads((out / "hf" / "config.json").read_text())
        original = json.loads((reference_run / "hf" / "config.json").read_text())
        assert exported.pop(NAME_KEY) != original.pop(NAME_KEY)  # each run exports under its own name
        assert exported == original  # the same shape
        saved = yaml.safe_load((out / "step-3" / "config.yaml").read_text())
        assert saved["init"] == str(init) and saved["data"]["tokenizer"]  # found from DIR, saved
    assert first_losses["from_hf"] == pytest.approx(first_losses["from_run"], abs=1e-5)  # the same weights

    result = pretrain(config, "--init", str(reference_run / "hf"), "--model.dim", "128")
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error == [
        f"pretrain_llama.py: error: the model section does not describe --init {reference_run / 'hf'}: dim 128 vs 64"
    ]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# Several processes

DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from tests.helpers.training import RowStream, tiny_run
    from models.llama import Llama
    from training.distributed import build_accelerator
    from training.loop import train
    from training.objectives import CausalLMObjective

    out, micro_batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = tiny_run(__import__("pathlib").Path(out), max_steps=10, grad_accum_steps=accum)
    accelerator = build_accelerator(config.train)
    torch.manual_seed(0)
    model = Llama(config.model)
    world, rank = accelerator.num_processes, accelerator.process_index
    # The global batch of 4 rows per step is split across ranks and accumulation steps.
    class Split(RowStream):
        def __iter__(self):
            for batch in RowStream.__iter__(self):
                rows = {k: v[rank::world] for k, v in batch.items()}
                for i in range(accum):
                    yield {k: v[i * micro_batch:(i + 1) * micro_batch] for k, v in rows.items()}
    # Unequal held-out shares (2 batches on rank 0, 1 elsewhere): validation forwards are collective
    # under DDP, so every rank must evaluate the same number of batches or the run hangs.
    config.train.eval_every = 5
    val = [b for b, _ in zip(RowStream(), range(2 if rank == 0 else 1))]
    result = train(model, Split(), CausalLMObjective(), config=config, accelerator=accelerator, val_data=val)
    if accelerator.is_main_process:
        print("LOSSES", json.dumps(result.losses), "WORLD", world)
    """
)


def run_driver(tmp_path: Path, name: str, launcher: list[str], micro_batch: int, accum: int) -> list[float]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [*launcher, str(script), str(tmp_path / name), str(micro_batch), str(accum)]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("LOSSES"))
    return json.loads(line.split(" ", 1)[1].rsplit(" WORLD", 1)[0])


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    accelerate = [
        str(Path(PYTHON).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu.yaml"),
    ]
    one = run_driver(tmp_path, "one", [PYTHON], micro_batch=4, accum=1)
    accumulated = run_driver(tmp_path, "accum", [PYTHON], micro_batch=2, accum=2)
    two = run_driver(tmp_path, "two", [*accelerate, "--num_processes", "2"], micro_batch=2, accum=1)
    assert len(one) == len(two) == 10
    assert one[-1] < one[0]
    for a, b, c in zip(one, two, accumulated):
        assert abs(a - b) < 1e-5 and abs(a - c) < 1e-5, (one, two, accumulated)


FROZEN_DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from tests.helpers.training import AgreementWithReference, RowStream, tiny_run
    from models.llama import Llama
    from training.distributed import build_accelerator
    from training.loop import train

    out = Path(sys.argv[1])
    config = tiny_run(out, max_steps=4, eval_every=2)
    accelerator = build_accelerator(config.train)
    torch.manual_seed(0)
    model, reference = Llama(config.model), Llama(config.model)
    reference.load_state_dict(model.state_dict())
    rank, world = accelerator.process_index, accelerator.num_processes
    class Split(RowStream):
        def __iter__(self):
            for batch in RowStream.__iter__(self):
                yield {k: v[rank::world] for k, v in batch.items()}
    val = [b for b, _ in zip(RowStream(), range(2))]
    train(model, Split(), AgreementWithReference(), config=config, accelerator=accelerator, val_data=val,
          frozen={"reference": reference})
    if accelerator.is_main_process:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print("RECORDS", json.dumps(records))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed_zero3", "fsdp"])
def test_a_frozen_model_is_sharded_like_the_policy_and_two_processes_match_one(tmp_path, backend):
    """Under ZeRO-3 and FSDP the policy and its frozen reference are sharded over two CPU processes; the
    losses and the reference-dependent metric equal one process's, so every use of a sharded weight (the LM
    head inside the chunked loss included) saw the whole weight."""
    if backend == "deepspeed_zero3":
        pytest.importorskip("deepspeed")
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN_DRIVER)
    names = ("loss", "drift_from_reference", "val_loss")

    def run(launcher: list[str], out: Path) -> list[tuple]:
        cmd = [*launcher, str(script), str(out)]
        result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        line = next(x for x in result.stdout.splitlines() if x.startswith("RECORDS"))
        records = json.loads(line.split(" ", 1)[1])
        return [tuple(r.get(n) for n in names) for r in records]

    one = run([PYTHON], tmp_path / "one")
    accelerate = [str(Path(PYTHON).parent / "accelerate"), "launch", "--num_processes", "2"]
    two = run(
        [*accelerate, "--config_file", str(REPO / f"configs/accelerate/{backend}.yaml")], tmp_path / "two"
    )
    assert len(one) == len(two) == 4
    assert one[0][1] == pytest.approx(0.0, abs=1e-5) and one[-1][1] > 0  # the policy moved off the reference
    for a, b in zip(one, two):
        assert a == pytest.approx(b, abs=1e-5), (one, two)


READER_DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from dataset.pretrain_dataset import PretrainDataConfig, build_pretrain_dataloader
    from dataset.tokenizer import Tokenizer
    from tests.helpers.shards import first_epoch_documents
    from training.config import TrainConfig
    from training.distributed import build_accelerator

    shards, tokenizer_dir, out = sys.argv[1:4]
    accelerator = build_accelerator(TrainConfig(precision="fp32"))
    rank, world = accelerator.process_index, accelerator.num_processes
    tokenizer = Tokenizer.load(tokenizer_dir)
    config = PretrainDataConfig(shards=[shards], seq_len=64, batch_size=8, num_workers=1, unit_docs=16)
    with build_pretrain_dataloader(config, tokenizer, rank=rank, world_size=world) as loader:
        docs = first_epoch_documents(loader, tokenizer.eos_id, max_batches=600)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"world": world, "docs": docs}))
    """
)


@pytest.mark.slow
def test_two_processes_together_read_each_document_exactly_once(real_data, tmp_path):
    script = tmp_path / "reader.py"
    script.write_text(READER_DRIVER)
    cmd = [
        str(Path(PYTHON).parent / "accelerate"), "launch", "--num_processes", "2",
        "--config_file", str(REPO / "configs/accelerate/cpu.yaml"),
        str(script), str(real_data["shards"] / "*.jsonl.zst"), str(real_data["tokenizer"]), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    from dataset.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(real_data["tokenizer"])
    shards = sorted(real_data["shards"].glob("*.jsonl.zst"))
    every = {
        tuple(tokenizer.encode(r["text"], bos=True, eos=True)) for p in shards for r in iter_shard_records(p)
    }
    read = [tuple(d) for r in ranks for d in r["docs"]]
    assert len(read) == len(set(read)) == len(every)  # no document twice, within or across ranks
    assert set(read) == every
    assert all(len(r["docs"]) >= len(every) // 3 for r in ranks)  # both ranks did their share


@pytest.mark.slow
def test_deepspeed_zero1_two_cpu_processes_train_checkpoint_and_resume(real_data, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero1"
    config = run_config(real_data, out, train={"max_steps": 6, "checkpoint_every": 3, "eval_every": 0})
    launcher = [
        str(Path(PYTHON).parent / "accelerate"), "launch", "--num_processes", "2",
        "--config_file", str(REPO / "configs/accelerate/deepspeed_zero1.yaml"),
    ]  # fmt: skip
    result = pretrain(config, launcher=launcher, **{faults.NAN_LOSS_STEPS_ENV: "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    state = json.loads((out / "step-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert state["nonfinite_steps"] == 1  # the NaN at step 2 was skipped on both ranks, and training went on
    assert (out / "step-6" / "pytorch_model").is_dir()  # DeepSpeed's ZeRO checkpoint layout
    rank_states = [torch.load(out / "step-6" / f"loop_state_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert rank_states[0]["train_data"]["fingerprint"]["rank"] == 0
    assert rank_states[1]["train_data"]["fingerprint"]["rank"] == 1
    full = losses(out)
    assert 2 not in full and full[6] < full[1]

    # Resume from step 3: steps 4-6 come out the same.
    import shutil

    shutil.rmtree(out / "step-6")
    (out / "latest").write_text("step-3\n")
    result = pretrain(config, "--resume", "auto", launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = losses(out)
    assert resumed == pytest.approx(full, abs=1e-6)


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H20", 148e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Some Future GPU", None),
    ],
)
def test_datasheet_peak_matches_the_most_specific_gpu_name(monkeypatch, device_name, peak):
    from training.metrics import peak_flops_per_device

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert peak_flops_per_device(torch.device("cuda")) == peak
    assert peak_flops_per_device(torch.device("cuda"), override=1e15) == 1e15
    assert peak_flops_per_device(torch.device("cpu")) is None
