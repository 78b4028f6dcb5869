"""Downstream evaluation inside a training run (the `eval` section, training/evaluation.py DownstreamEvaluator).

- its figures equal evaluate.py's (evaluation/evaluator.py `evaluate`) on the same model, tasks and shards;
- scoring leaves the model as it found it: training mode, no gradients, the same weights;
- two processes, each scoring a share of the documents, log the figures of one;
- the progress line shows CORE, and a bad task name fails the stage before its first step (exit 2).

The end-to-end run (metrics.jsonl, the loss curve's second panel, exact resume) is tests/test_training.py's
reference run, which has an `eval` section. Task files: tests/helpers/eval_tasks.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from evaluation.encoding import TextEncoder
from evaluation.evaluator import evaluate
from evaluation.tasks import CORE, load_task, resolve_tasks
from models.llama import Llama
from tests.helpers.eval_tasks import colour_documents, write_gold_answer_task, write_task
from tests.helpers.model import tiny_model_config
from tests.helpers.shards import synthetic_texts, write_shard
from tests.helpers.training import PYTHON, REPO, env
from training.config import EvalConfig, TrainConfig
from training.distributed import build_accelerator
from training.evaluation import DownstreamEvaluator
from training.loop import _bar_figures

CORE_TASKS = list(CORE)  # synthetic task files under CORE's names, so `eval/core` is logged


@pytest.fixture(scope="module")
def setup(synthetic_tokdir, tmp_path_factory) -> dict:
    """CORE's ten task names and a gold-answer task (7 documents each: not a multiple of two ranks), two
    sources of held-out shards, and a tiny model for the tokenizer."""
    root = tmp_path_factory.mktemp("in_loop_eval")
    tasks = root / "oe_eval_tasks"
    for seed, name in enumerate(CORE_TASKS):
        write_task(tasks, name, "rc_5shot", colour_documents(7, seed), "acc_per_char")
    write_gold_answer_task(tasks, "syn_gold", "gold_bpb_5shot", colour_documents(7))
    texts = synthetic_texts(40)
    (root / "held").mkdir()
    write_shard(root / "held" / "part-books-00000.jsonl.zst", texts[:20], "books")
    write_shard(root / "held" / "part-code-00000.jsonl.zst", texts[20:], "code")
    vocab = TextEncoder(synthetic_tokdir).vocab_size
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=vocab, max_seq_len=64))
    return {
        "tasks": tasks,
        "shards": str(root / "held" / "*.jsonl.zst"),
        "tokenizer": synthetic_tokdir,
        "model": model,
    }


def eval_config(setup: dict) -> EvalConfig:
    return EvalConfig(
        tasks=["core,syn_gold"], limit=5, batch_size=4, shards=[setup["shards"]], task_dir=str(setup["tasks"])
    )


def test_in_loop_figures_equal_evaluate_py_and_the_model_is_left_as_it_was(setup):
    model = setup["model"]
    config = eval_config(setup)
    evaluator = DownstreamEvaluator(config, setup["tokenizer"], model_vocab_size=model.config.vocab_size)
    accelerator = build_accelerator(TrainConfig(precision="fp32"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    record = evaluator.run(model, accelerator)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    encoder = TextEncoder(setup["tokenizer"])
    folders = resolve_tasks(config.tasks, setup["tasks"])
    tasks = [load_task(name, path, config.limit) for name, path in folders.items()]
    results, _ = evaluate(model, encoder, tasks, shards=config.shards, limit=config.limit, batch_size=4)
    model.train()
    expected = {"eval/core": results["core"]}
    for name, figures in results["tasks"].items():
        expected.update(
            {f"eval/{name}/{k}": figures[k] for k in ("accuracy", "centered", "bpb") if k in figures}
        )
    expected.update({f"eval/bpb/{source}": bpb for source, bpb in results["bpb"].items()})
    assert set(record) == set(expected) and {"eval/bpb/books", "eval/bpb/code"} <= set(record)
    assert "eval/syn_gold/bpb" in record and "eval/syn_gold/accuracy" not in record
    assert record == pytest.approx(expected, abs=1e-9)
    # Stateless: the same weights give the same figures again.
    assert evaluator.run(model, accelerator) == record
    # The progress line shows the CORE figure.
    assert _bar_figures(record)["core"] == f"{record['eval/core']:.3f}"


def test_every_steps_and_always_at_the_end(setup):
    config = eval_config(setup)
    vocab = setup["model"].config.vocab_size
    every_3 = DownstreamEvaluator(
        EvalConfig(**{**vars(config), "every": 3}), setup["tokenizer"], model_vocab_size=vocab
    )
    at_end = DownstreamEvaluator(config, setup["tokenizer"], model_vocab_size=vocab)
    assert [s for s in range(1, 8) if every_3.should_run(s, final=s == 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if at_end.should_run(s, final=s == 7)] == [7]


DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from models.llama import Llama
    from tests.helpers.model import tiny_model_config
    from training.config import EvalConfig, TrainConfig
    from training.distributed import build_accelerator
    from training.evaluation import DownstreamEvaluator

    config = EvalConfig(**json.loads(sys.argv[1]))
    tokenizer, vocab, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    accelerator = build_accelerator(TrainConfig(precision="fp32"))
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=vocab, max_seq_len=64))
    prepared = accelerator.prepare(model)  # DDP over gloo with two processes
    record = DownstreamEvaluator(config, tokenizer, model_vocab_size=vocab).run(prepared, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    with open(f"{out}/{world}-{rank}.json", "w") as f:
        json.dump(record, f)
    accelerator.end_training()  # destroys the process group, as the training loop does: else exit can abort
    """
)


@pytest.mark.slow
def test_two_processes_each_scoring_a_share_log_the_figures_of_one(setup, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    config = vars(eval_config(setup))
    vocab = str(setup["model"].config.vocab_size)
    args = [str(script), json.dumps(config), str(setup["tokenizer"]), vocab, str(tmp_path)]
    accelerate = [
        str(Path(PYTHON).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu.yaml"),
        "--num_processes",
        "2",
    ]
    for launcher in ([PYTHON], accelerate):
        result = subprocess.run(
            [*launcher, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
    one, first, second = (
        json.loads((tmp_path / f"{name}.json").read_text()) for name in ("1-0", "2-0", "2-1")
    )
    assert first == second  # every rank has the gathered figures
    assert set(one) == set(first) and "eval/core" in one
    for key, value in one.items():
        if key.endswith(("/accuracy", "/centered", "core")):
            assert first[key] == value, key  # counts of right answers: exact
        else:
            assert first[key] == pytest.approx(value, rel=1e-5), key  # other batches, other float sums


def test_a_bad_task_name_fails_the_stage_before_any_step(real_data, tmp_path):
    from tests.helpers.training import pretrain, run_config

    config = run_config(real_data, tmp_path / "run", eval={"tasks": ["arc_easyy"], "task_dir": str(tmp_path)})
    write_task(tmp_path, "arc_easy", "rc_5shot", colour_documents(2), "acc_per_char")
    result = pretrain(config)
    assert result.returncode == 2
    assert "pretrain_llama.py: error: unknown task(s) arc_easyy; valid: core, arc_easy" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_lora_model_is_scored_through_its_adapters_without_dropout(setup):
    from training.lora import LoraConfig, add_lora

    model = setup["model"]
    config = eval_config(setup)
    evaluator = DownstreamEvaluator(config, setup["tokenizer"], model_vocab_size=model.config.vocab_size)
    accelerator = build_accelerator(TrainConfig(precision="fp32"))
    plain = evaluator.run(model, accelerator)
    lora = add_lora(copy.deepcopy(model), LoraConfig(rank=4, dropout=0.5))
    lora.train()
    # B starts at zero: the adapted model is the plain one, and dropout (training mode only) is off.
    assert evaluator.run(lora, accelerator) == pytest.approx(plain, rel=1e-6)
    assert lora.training


@pytest.mark.parametrize("stage", ["pretrain_llama", "instruction_tuning", "preference_tuning"])
def test_every_stage_takes_an_eval_section(stage):
    from common.config import parse_config

    module = __import__(stage)
    config_class = {
        "pretrain_llama": "PretrainConfig",
        "instruction_tuning": "SFTConfig",
        "preference_tuning": "DPOConfig",
    }[stage]
    args = [
        "--data.tokenizer",
        "tok",
        "--eval.tasks",
        "core,gsm8k",
        "--eval.every",
        "100",
        "--eval.limit",
        "50",
    ]
    if stage == "pretrain_llama":
        args += ["--data.shards", "x"]
    config = parse_config(getattr(module, config_class), args)
    assert config.eval == EvalConfig(tasks=["core,gsm8k"], every=100, limit=50)
