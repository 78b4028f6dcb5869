"""Chat server speed: our engine beside transformers' `generate`, on the same exported weights, in one run.

A model of the chosen preset (random weights: speed does not depend on them) is exported with export_hf
beside a tokenizer (trained on ../shared/corpus when present, else on generated text), then both sides
generate greedily from the same prompts, `--new-tokens` each with the stop token ignored, so every row
does the same work:

- batch 1: time to first token (TTFT) and decode tokens/s after it; transformers' `generate` timed with a
  streamer that notes when each token comes, ours through `Engine.stream`, the path the API and UI use;
- `--concurrency` requests at once: total generated tokens/s from submit to the last token; ours as
  concurrent requests (continuous batching), transformers as one left-padded batch `generate` (static
  batching, its best case: all prompts known in advance);
- the same two through HTTP: `chat_server.py` in a subprocess (API only) and the `openai` client streaming
  from /v1/completions, on the same CPU cores.

Goals (issue "chat server"): batch-1 decode at least 2x transformers' (3x the aim), and `--concurrency` 8
concurrent requests at least 4x our own batch-1 total throughput. transformers runs with 1 and with 2 torch
threads (the ratio is against its better figure); our engine uses its default, all cores but one. Runs
alternate (theirs, ours, ...) and the figures are medians, so load from other jobs hits both sides alike;
the load average is printed.

    python bench/bench_serve.py                           # tiny preset, 64-token prompts, 128 new tokens
    python bench/bench_serve.py --preset 125m --new-tokens 64 --rounds 2
    python bench/bench_serve.py --dtype bfloat16           # both sides in bf16 (AMX CPUs, GPUs)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/bench_serve.py` from a fresh clone
SHARED_PILE = REPO.parent / "shared" / "corpus" / "raw" / "pile" / "00.jsonl.zst"


def build_folder(root: Path, preset: str, vocab: int) -> tuple[Path, str]:
    """Tokenizer + random model of `preset` exported as a Hugging Face folder; returns (folder, text source)."""
    import orjson
    import torch
    import zstandard

    from dataset.train_tokenizer import train_tokenizer
    from models.hf import export_hf
    from models.llama import Llama, ModelConfig

    if SHARED_PILE.is_file():
        source, shard = (
            f"{vocab}-token tokenizer trained on {SHARED_PILE.name} of ../shared/corpus",
            SHARED_PILE,
        )
    else:
        rng = random.Random(0)
        words = [f"w{i}" + "abcdefghij"[i % 10] * (i % 4) for i in range(3000)]
        texts = [" ".join(rng.choices(words, k=200)) for _ in range(3000)]
        shard = root / "part-generated-0.jsonl.zst"
        lines = b"".join(orjson.dumps({"text": t, "meta": {"source": "bench"}}) + b"\n" for t in texts)
        shard.write_bytes(zstandard.ZstdCompressor().compress(lines))
        source = f"{vocab}-token tokenizer trained on generated text (no ../shared/corpus)"
    tokdir = train_tokenizer([str(shard)], vocab, root / "tokenizer", sample_bytes=4 << 20)
    from dataset.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, vocab_size=Tokenizer.load(tokdir).vocab_size)
    return export_hf(Llama(config), root / "model", tokenizer_dir=tokdir), source


def prompts_for(folder: Path, count: int, length: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` ids (BOS + text)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rng = random.Random(1)
    vocab = [t for t in tokenizer.get_vocab() if t.isalpha()]
    prompts = []
    for _ in range(count):
        ids = tokenizer(" ".join(rng.choices(vocab, k=length)))["input_ids"][:length]
        prompts.append(ids)
    return prompts


class Clock:
    """A transformers streamer noting when tokens arrive (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def theirs_single(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    import torch

    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=clock,
            pad_token_id=0,
        )
    first, last = clock.times[1], clock.times[-1]
    return first - start, (new_tokens - 1) / (last - first)


def theirs_batch(model, prompts: list[list[int]], new_tokens: int) -> float:
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    assert out.shape[1] == width + new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - start)


async def _ours_one(engine, prompt: list[int], new_tokens: int) -> tuple[float, float, float]:
    """(submit time, first-text time, end time) of one request through Engine.stream."""
    from serve.engine import SamplingParams

    start = time.perf_counter()
    first = None
    first_tokens = 0
    async for event in engine.stream(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True)):
        if first is None and event.text:
            first, first_tokens = time.perf_counter(), event.completion_tokens
        assert event.error is None, event.error
    end = time.perf_counter()
    assert event.completion_tokens == new_tokens
    return start, first, end, first_tokens


def ours_single(engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    start, first, end, first_tokens = asyncio.run(_ours_one(engine, prompt, new_tokens))
    return first - start, (new_tokens - first_tokens) / (end - first)


def ours_concurrent(engine, prompts: list[list[int]], new_tokens: int) -> float:
    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(_ours_one(engine, p, new_tokens) for p in prompts))
        return len(prompts) * new_tokens / (time.perf_counter() - start)

    return asyncio.run(run())


async def _http_one(client, prompt: list[int], new_tokens: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    first = None
    chunks = 0
    stream = await client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            first = first or time.perf_counter()
    return start, first, time.perf_counter()


def http_rows(folder: Path, prompts: list[list[int]], new_tokens: int, rounds: int) -> dict[str, list]:
    """TTFT, decode tokens/s and concurrent throughput as an `openai` client sees them."""
    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(REPO / "chat_server.py"), "--model", str(folder), "--port", str(port)]
    command += ["--model-name", "bench", "--server.ui", "false", "--slots", str(len(prompts))]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    results: dict[str, list] = {"ttft": [], "decode": [], "concurrent": []}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.2)

        async def measure() -> None:
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
            ) as client:
                await _http_one(client, prompts[0], 8)  # warm-up
                for _ in range(rounds):
                    start, first, end = await _http_one(client, prompts[0], new_tokens)
                    results["ttft"].append(first - start)
                    results["decode"].append((new_tokens - 1) / (end - first))
                    start = time.perf_counter()
                    await asyncio.gather(*(_http_one(client, p, new_tokens) for p in prompts))
                    results["concurrent"].append(len(prompts) * new_tokens / (time.perf_counter() - start))

        asyncio.run(measure())
    finally:
        server.terminate()
        server.wait(timeout=30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, 125m, ...)")
    parser.add_argument(
        "--vocab", type=int, default=8000, help="tokenizer (and model) vocabulary, as the demo's"
    )
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides")
    parser.add_argument("--no-http", action="store_true", help="skip the rows through chat_server.py")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from serve.api import ServerState
    from serve.app import load
    from serve.engine import EngineConfig

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
        folder, source = build_folder(Path(tmp), args.preset, args.vocab)
        prompts = prompts_for(folder, args.concurrency, args.prompt_tokens)
        theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
        theirs.eval()
        state = ServerState(model_name="bench")
        engine_config = EngineConfig(slots=args.concurrency, max_queue=0, dtype=args.dtype)
        load(state, folder, engine_config)
        engine = state.engine
        params = sum(p.numel() for p in theirs.parameters())

        # transformers runs in this thread with 1 and with 2 torch threads (its best counts); the engine
        # sets its own thread's count (EngineConfig.threads: all cores but one).
        rows: dict[str, list[float]] = collections.defaultdict(list)
        for threads in (1, 2):  # warm-up: first calls allocate and pick kernels
            torch.set_num_threads(threads)
            theirs_single(theirs, prompts[0], 8)
        ours_single(engine, prompts[0], 8)
        for _ in range(args.rounds):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                ttft, decode = theirs_single(theirs, prompts[0], args.new_tokens)
                rows[f"h{threads}_ttft"].append(ttft)
                rows[f"h{threads}_dec"].append(decode)
                rows[f"h{threads}_batch"].append(theirs_batch(theirs, prompts, args.new_tokens))
            ttft, decode = ours_single(engine, prompts[0], args.new_tokens)
            rows["o_ttft"].append(ttft)
            rows["o_dec"].append(decode)
            rows["o_conc"].append(ours_concurrent(engine, prompts, args.new_tokens))
        engine.close()
        http = None if args.no_http else http_rows(folder, prompts, args.new_tokens, args.rounds)

    med = {k: statistics.median(v) for k, v in rows.items()}
    best = max((1, 2), key=lambda t: med[f"h{t}_dec"])
    best_batch = max((1, 2), key=lambda t: med[f"h{t}_batch"])
    # batch-1 total throughput (prefill included): what one user alone gets, the base of the 4x goal.
    ours_single_total = args.new_tokens / (med["o_ttft"] + (args.new_tokens - 1) / med["o_dec"])
    load1, load5, _ = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {cores} cores, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; load average {load1:.1f} / "
        f"{load5:.1f} (1 / 5 min) at the end"
    )
    print(
        f"model: {args.preset} preset, {params / 1e6:.1f}M parameters ({args.dtype}, random weights), {source}; "
        f"prompts {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, medians of {args.rounds}; "
        f"the engine decodes with {max(1, cores - 1)} torch thread(s)\n"
    )
    n = args.concurrency

    def theirs(key: str, fmt: str) -> str:
        return " / ".join(fmt.format(med[f"h{t}_{key}"] * (1000 if key == "ttft" else 1)) for t in (1, 2))

    table = [
        ("batch 1: time to first token", theirs("ttft", "{:.1f} ms"), f"{med['o_ttft'] * 1000:.1f} ms", ""),
        (
            "batch 1: decode tokens/s",
            theirs("dec", "{:.1f}"),
            f"{med['o_dec']:.1f}",
            f"{med['o_dec'] / med[f'h{best}_dec']:.2f}x transformers' best (goal 2x, aim 3x)",
        ),
        (
            f"{n} requests: total tokens/s",
            theirs("batch", "{:.1f}") + " (one static batch)",
            f"{med['o_conc']:.1f} (concurrent)",
            f"{med['o_conc'] / ours_single_total:.2f}x our batch-1 total of {ours_single_total:.1f} (goal 4x); "
            f"{med['o_conc'] / med[f'h{best_batch}_batch']:.2f}x transformers' best",
        ),
    ]
    if http:
        h = {k: statistics.median(v) for k, v in http.items()}
        table += [
            (
                "HTTP batch 1: time to first token",
                "",
                f"{h['ttft'] * 1000:.1f} ms",
                "openai client, streamed",
            ),
            (
                "HTTP batch 1: decode tokens/s",
                "",
                f"{h['decode']:.1f}",
                f"{h['decode'] / med[f'h{best}_dec']:.2f}x transformers' best",
            ),
            (f"HTTP {n} requests: total tokens/s", "", f"{h['concurrent']:.1f}", ""),
        ]
    print("| measurement | transformers `generate`, 1 / 2 threads | ours | ratio |")
    print("|---|---:|---:|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
