"""The export tokenizes the same in the tools users take it to (docs/export.md).

- tokenizer_config.json states what the tokenizer does, for loaders that read it instead of tokenizer.json
  (transformers' LlamaTokenizer, forced on the folder, then gives AutoTokenizer's ids).
- llama.cpp's converter (convert_hf_to_gguf.py, fetched into .venv/llama.cpp by `make setup`): the tokenizer
  metadata it writes into the GGUF file says what our tokenizer does (no space before the text, <s> first,
  no </s>, the SentencePiece pieces, scores and types).
- llama.cpp itself (llama-cpp-python, not installed by `make setup`: it compiles llama.cpp): the same ids
  as transformers' AutoTokenizer, and the same text back.
- lm-eval (not installed by `make setup`): the documented flags score exactly log p(text | <s>).

Each test skips, saying why, when its tool is absent. The export is a tiny model with a tokenizer trained
here on a few KB of generated English, Chinese and code.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import sentencepiece as spm
import torch
import zstandard

from dataset.chat_template import CHAT_TEMPLATE, ROLE_TOKENS
from dataset.train_tokenizer import train_tokenizer
from models.hf import export_hf
from models.llama import Llama, ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONVERTER_DIR = Path(os.environ.get("LLAMA_CPP_CONVERTER_DIR", REPO_ROOT / ".venv" / "llama.cpp"))
CONVERTER = CONVERTER_DIR / "convert_hf_to_gguf.py"

# Texts whose ids the tools must agree on: leading, repeated and trailing spaces, tabs, newlines, Chinese,
# code, characters outside the vocabulary (byte fallback), and control-token spellings (plain text).
TEXTS = [
    "To be, or not to be: that is the question.",
    " leading space",
    "  two leading spaces and two  inside",
    "trailing spaces   ",
    "line one\nline two\n\n\nafter three newlines\r\n",
    "\ttab\t\tand    four spaces",
    "中文文本，混合English与数字12345。",
    "人工智能 的 发展",
    "def forward(self, x):\n    if x is None:\n        return 0\n\treturn x + 1  # done\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "emoji 😀 and rare characters ƒ ☃ and a zero width\u200bspace",
    "\n",
    " ",
    "<s> </s> <pad> <|user|> <|end|> spelled out",
]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be: that is the question.",
    "A language model predicts the next token from the tokens before it.",
    "Training runs on many machines, and every step writes a checkpoint.",
    "人工智能的发展改变了我们的生活。",
    "机器学习模型需要大量的数据进行训练。",
    "今天天气很好，我们去公园散步吧。",
]
CODE = [
    "def forward(self, x):\n    h = self.norm(x)\n    return x + self.attn(h)\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "int main(void) {\n    return 0;\n}\n",
]


def _documents(n: int = 240, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(rng.choice(SENTENCES + CODE) + " " * rng.randint(0, 3) for _ in range(rng.randint(3, 8)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny model exported with a tokenizer trained on generated text."""
    root = tmp_path_factory.mktemp("export_tools")
    lines = b"".join(orjson.dumps({"text": t, "meta": {"source": "test"}}) + b"\n" for t in _documents())
    (root / "part-0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    tokdir = train_tokenizer(str(root / "part-0.jsonl.zst"), 600, root / "tok", log=None, progress=False)
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokdir / "tokenizer.model")).get_piece_size()
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", vocab_size=vocab_size, dim=64, n_layers=1, n_heads=2, n_kv_heads=1
    )
    return export_hf(Llama(config).eval(), root / "hf", tokenizer_dir=tokdir)


@pytest.fixture(scope="module")
def hf_tokenizer(export_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export_dir)


def test_tokenizer_config_states_what_the_tokenizer_does(export_dir, hf_tokenizer):
    """tokenizer_config.json says <s> first, no </s>, no space before the text; transformers' LlamaTokenizer,
    which rebuilds the pipeline from the vocabulary and these flags (a loader may force that class), then
    gives AutoTokenizer's ids and text."""
    from transformers import LlamaTokenizer

    config = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"], config["add_prefix_space"]) == (
        True,
        False,
        False,
    )
    assert config["legacy"] is False
    llama = LlamaTokenizer.from_pretrained(export_dir)
    for text in TEXTS:
        ids = hf_tokenizer(text, split_special_tokens=True)["input_ids"]
        assert llama(text, split_special_tokens=True)["input_ids"] == ids
        assert llama.decode(ids, skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def gguf_file(export_dir) -> Path:
    """The export converted by llama.cpp's own converter."""
    if not CONVERTER.is_file():
        pytest.skip(
            f"llama.cpp's converter not found at {CONVERTER} (`make setup` fetches it; "
            "or point LLAMA_CPP_CONVERTER_DIR at a llama.cpp checkout)"
        )
    out = export_dir.parent / "model-f32.gguf"
    run = subprocess.run(
        [sys.executable, str(CONVERTER), str(export_dir), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"convert_hf_to_gguf.py failed:\n{run.stderr[-4000:]}"
    return out


def _gguf_module():
    """gguf-py as shipped next to the converter (the version it writes with)."""
    gguf_py = str(CONVERTER_DIR / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    return importlib.import_module("gguf")


def test_converter_writes_what_the_tokenizer_does(export_dir, gguf_file):
    """The GGUF tokenizer metadata: llama.cpp reads these instead of guessing (add_space_prefix is
    assumed true for a SentencePiece vocabulary when absent, which put a space before every prompt)."""
    gguf = _gguf_module()
    reader = gguf.GGUFReader(gguf_file)

    def value(key):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    assert value("tokenizer.ggml.model") == "llama"  # SentencePiece-style vocabulary (llama.cpp's SPM)
    assert value("tokenizer.ggml.add_space_prefix") is False
    assert value("tokenizer.ggml.remove_extra_whitespaces") in (None, False)  # llama.cpp's default: False
    assert value("tokenizer.ggml.add_bos_token") is True
    assert value("tokenizer.ggml.add_eos_token") is False
    assert (
        value("tokenizer.ggml.bos_token_id"),
        value("tokenizer.ggml.eos_token_id"),
        value("tokenizer.ggml.unknown_token_id"),
        value("tokenizer.ggml.padding_token_id"),
    ) == (1, 2, 0, 3)
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE

    sp = spm.SentencePieceProcessor(model_file=str(export_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    assert json.loads((export_dir / "config.json").read_text())["vocab_size"] == n
    assert value("tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)]
    assert value("tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(n)])
    types = value("tokenizer.ggml.token_type")
    kinds = {gguf.TokenType.CONTROL: sp.is_control, gguf.TokenType.BYTE: sp.is_byte}
    for kind, check in kinds.items():
        assert [i for i in range(n) if types[i] == kind] == [i for i in range(n) if check(i)]
    assert all(types[sp.piece_to_id(token)] == gguf.TokenType.CONTROL for token in ROLE_TOKENS.values())


@pytest.fixture(scope="module")
def llama_cpp_vocab(gguf_file):
    """llama.cpp's tokenizer on the converted file (vocabulary only, no weights)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp; see docs/export.md)"
    )
    return llama_cpp, llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)


def _llama_cpp_detokenize(llama_cpp, llm, ids: list[int]) -> str:
    vocab = llm._model.vocab
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 16 * len(ids) + 16
    buffer = bytes(size)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, size, True, False)
    assert 0 <= n <= size
    return buffer[:n].decode("utf-8")


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_llama_cpp_tokenizes_like_transformers(llama_cpp_vocab, hf_tokenizer, text):
    llama_cpp, llm = llama_cpp_vocab
    # Plain text: control-token spellings stay text on both sides (special=False / split_special_tokens).
    want = hf_tokenizer(text, split_special_tokens=True)["input_ids"]
    assert want[:1] == [1]
    got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    assert got == want
    assert (
        _llama_cpp_detokenize(llama_cpp, llm, got)
        == text
        == hf_tokenizer.decode(want, skip_special_tokens=True)
    )


def test_llama_cpp_chat_prompt_and_stop_token(llama_cpp_vocab, hf_tokenizer):
    """llama-cpp-python renders the GGUF's chat template as transformers does, and the rendered prompt
    (role tokens parsed as special, as its chat completion does) gives apply_chat_template's ids; llama.cpp
    finds <|end|> as the end-of-turn (a stop) token by its name."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llama_cpp, llm = llama_cpp_vocab
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi\nthere 你好"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    template = llm.metadata["tokenizer.chat_template"]
    assert (
        Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=messages).prompt == prompt
    )
    assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == want
    end = hf_tokenizer.convert_tokens_to_ids(ROLE_TOKENS["end"])
    assert llama_cpp.llama_vocab_eot(llm._model.vocab) == end
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end)
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, hf_tokenizer.eos_token_id)


# --- lm-eval ------------------------------------------------------------------------------------------------

TEXT = "To be, or not to be: that is the question.\n  Whether 'tis nobler in the mind to suffer"


def _exact_logprob(export_dir, hf_tokenizer) -> float:
    """log p(text | <s>) from stock transformers: the number a perplexity task should sum."""
    from transformers import AutoModelForCausalLM

    ids = hf_tokenizer(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip(
        "lm_eval", reason="lm-eval is not installed (pip install lm-eval; see docs/export.md)"
    )


def _hflm(export_dir, **model_args):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(export_dir), device="cpu", batch_size=1, **model_args)
    seen: list[list[int]] = []
    model_call = lm._model_call

    def spy(inputs, *args, **kwargs):  # the ids lm-eval feeds the model
        seen.append(inputs[0].tolist())
        return model_call(inputs, *args, **kwargs)

    lm._model_call = spy
    return lm, seen


def _rolling(lm) -> float:
    from lm_eval.api.instance import Instance

    request = Instance("loglikelihood_rolling", {}, (TEXT,), 0)
    return lm.loglikelihood_rolling([request], disable_tqdm=True)[0]


def test_lm_eval_perplexity_flags_score_text_after_one_bos(lm_eval, export_dir, hf_tokenizer):
    """docs/export.md: perplexity tasks with add_bos_token=False score exactly log p(text | <s>)."""
    lm, seen = _hflm(export_dir, add_bos_token=False)
    exact = _exact_logprob(export_dir, hf_tokenizer)
    assert _rolling(lm) == pytest.approx(exact, abs=1e-3)
    assert seen[0][:2] == [1, hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"][0]]


def test_lm_eval_default_flags(lm_eval, export_dir, hf_tokenizer):
    """Without flags, lm-eval (0.4.13) lets the tokenizer put <s> first, right for multiple-choice and
    generation tasks, but its rolling perplexity also puts its own <s> before that one and scores it: the
    reason docs/export.md runs perplexity tasks with add_bos_token=False."""
    from lm_eval.api.instance import Instance

    lm, seen = _hflm(export_dir)
    rolling = _rolling(lm)
    assert seen[0][:3] == [1, 1, hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"][0]], (
        "lm-eval no longer puts a second <s> in rolling perplexity: update docs/export.md"
    )
    assert rolling < _exact_logprob(export_dir, hf_tokenizer)
    seen.clear()
    lm.loglikelihood([Instance("loglikelihood", {}, ("To be, or", " not"), 0)], disable_tqdm=True)
    assert seen[0] == hf_tokenizer("To be, or not")["input_ids"][:-1]  # one <s>, then the text
    assert lm.tok_batch_encode(["To be"])[0][0].tolist() == hf_tokenizer("To be")["input_ids"]
