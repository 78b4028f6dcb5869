"""GPU training speed: tokens/s, MFU and peak memory of transformers' LlamaForCausalLM (the baseline) and of
our Llama plain, with each speed switch, and with all of them, side by side in one run.

    pip install -r requirements.txt -r requirements-gpu.txt
    python bench/train_gpu.py --out results/                      # 125m and 1b at 2048 tokens, bf16
    python bench/train_gpu.py --presets 1b --only hf,ours,all --out results/ --append
    python bench/train_gpu.py --cpu-smoke --out /tmp/smoke        # tiny, CPU, fp32: checks the script works

Every configuration trains for `--warmup` untimed steps (torch.compile happens there) and `--steps` timed
steps on fixed random tokens, in a fresh subprocess with its own timeout, so an out-of-memory error, a hung
compile or a compile cache cannot leak into the next row. One training step is the same for every row:
bf16 autocast over fp32 weights (what the training loop does), loss.backward(), gradient clipping at 1.0,
AdamW (torch's default foreach kernel unless the row fuses it), zero_grad(set_to_none=True).

MFU is PaLM's (appendix B): tokens/s x flops_per_token(seq_len) / peak, against two peaks: the datasheet
dense bf16 figure of the GPU (the training loop's table in training/metrics.py, e.g. H100 SXM 989 TFLOP/s)
and the bf16 matmul throughput this script measures on the same GPU with a large torch.matmul loop.
Ratios are against the baseline row of the same preset (same batch, same sequence length).

Rows whose optional library is missing (liger-kernel, flash-attn, xformers) read "skipped: <reason>".
Results go to OUT/train_gpu.json and OUT/train_gpu.md (written after every row; --append keeps rows of
other presets/configurations already there, so a long run can be split into several calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/train_gpu.py` from a fresh clone, without `pip install -e .`

RESULT_PREFIX = "TRAIN_GPU_RESULT "


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One row: which model and which speed switches."""

    name: str
    description: str
    impl: str = "ours"  # "ours" or "hf" (transformers' LlamaForCausalLM, sdpa attention)
    attention_backend: str = "sdpa"
    fused_norm: bool = False
    fused_rope: bool = False
    fused_swiglu: bool = False
    fused_cross_entropy: str = "none"
    compile: bool = False
    fused_adamw: bool = False
    activation_checkpointing: bool = False
    documents: bool = False  # packed documents: position_ids restart per document, attention stays inside

    def needs(self) -> list[tuple[str, str]]:
        """(import name, pip name) of the optional libraries this row needs."""
        out = []
        if self.fused_norm or self.fused_rope or self.fused_swiglu or self.fused_cross_entropy == "liger":
            out.append(("liger_kernel", "liger-kernel"))
        if self.attention_backend == "flash_attn":
            out.append(("flash_attn", "flash-attn"))
        if self.attention_backend == "xformers":
            out.append(("xformers", "xformers"))
        return out


_LIGER = dict(fused_norm=True, fused_rope=True, fused_swiglu=True, fused_cross_entropy="liger")
CONFIGS: list[BenchConfig] = [
    BenchConfig("hf", "baseline: transformers LlamaForCausalLM, sdpa, torch AdamW", impl="hf"),
    BenchConfig("ours", "ours, plain (sdpa, PyTorch kernels, no compile)"),
    BenchConfig("fused_norm", "ours + Liger RMSNorm", fused_norm=True),
    BenchConfig("fused_rope", "ours + Liger RoPE", fused_rope=True),
    BenchConfig("fused_swiglu", "ours + Liger SwiGLU", fused_swiglu=True),
    BenchConfig("chunked_ce", "ours + chunked linear+CE (PyTorch)", fused_cross_entropy="chunked"),
    BenchConfig("liger_ce", "ours + Liger fused linear+CE", fused_cross_entropy="liger"),
    BenchConfig("compile", "ours + torch.compile per block", compile=True),
    BenchConfig("fused_adamw", "ours + fused AdamW", fused_adamw=True),
    BenchConfig("flash_attn", "ours + FlashAttention-2 backend", attention_backend="flash_attn"),
    BenchConfig("xformers", "ours + xformers backend", attention_backend="xformers"),
    # Document masking (pretraining with data.document_masking): the same tokens cut into documents of
    # DOCUMENT_MEAN_TOKENS on average. sdpa needs a dense mask there (no flash kernel); flash_attn's varlen
    # kernel and flex's block mask skip the masked blocks.
    BenchConfig("docs_sdpa", "ours, packed documents, sdpa + dense document mask", documents=True),
    BenchConfig(
        "docs_flash_attn",
        "ours, packed documents, flash_attn varlen",
        attention_backend="flash_attn",
        documents=True,
    ),
    BenchConfig(
        "docs_flex",
        "ours, packed documents, flex attention block mask",
        attention_backend="flex",
        documents=True,
    ),
    BenchConfig(
        "all_torch",
        "ours + compile + chunked CE + fused AdamW (no extra library)",
        fused_cross_entropy="chunked",
        compile=True,
        fused_adamw=True,
    ),
    BenchConfig(
        "all_eager", "ours + all Liger kernels + fused AdamW, no compile", fused_adamw=True, **_LIGER
    ),
    BenchConfig(
        "all", "ours + all Liger kernels + compile + fused AdamW", compile=True, fused_adamw=True, **_LIGER
    ),
    BenchConfig(
        "all_ac",
        "all + activation checkpointing (the memory floor)",
        compile=True,
        fused_adamw=True,
        activation_checkpointing=True,
        **_LIGER,
    ),
]
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}

DOCUMENT_MEAN_TOKENS = 512
DEFAULT_BATCH = {"tiny": 2, "125m": 8, "1b": 4, "350m": 8, "7b": 1}


# --------------------------------------------------------------------------------------------------
# Worker: one configuration in this process
# --------------------------------------------------------------------------------------------------


def build_model(config: BenchConfig, preset: str, vocab_size: int, seq_len: int, device: str):
    import torch

    from models.hf import hf_config_dict
    from models.llama import Llama, ModelConfig, RunOptions

    model_config = ModelConfig.from_preset(preset, vocab_size=vocab_size, max_seq_len=max(seq_len, 128))
    options = RunOptions(
        attention_backend=config.attention_backend,
        fused_norm=config.fused_norm,
        fused_rope=config.fused_rope,
        fused_swiglu=config.fused_swiglu,
        fused_cross_entropy=config.fused_cross_entropy,
        activation_checkpointing=config.activation_checkpointing,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly: seconds instead of a minute for 1b
        if config.impl == "ours":
            return Llama(model_config, options)
        from transformers import LlamaConfig, LlamaForCausalLM

        # Same shape; transformers has no stable-embedding LayerNorm, so the baseline does slightly less work.
        hf = hf_config_dict(
            model_config, tie_word_embeddings=model_config.tie_embeddings, dtype=torch.float32
        )
        hf_config = LlamaConfig(**{**hf, "use_cache": False}, attn_implementation="sdpa")
        return LlamaForCausalLM(hf_config)


def run_one(
    config: BenchConfig,
    *,
    preset: str,
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    warmup: int,
    steps: int,
    device: str,
    smoke: bool,
    compile_backend: str,
) -> dict[str, Any]:
    """Train `config` for warmup + steps steps; tokens/s over the timed steps, peak memory, losses."""
    import torch

    from models.kernels import compile_model, liger_unavailable_reason

    if device == "cpu" and config.attention_backend in ("flash_attn", "xformers"):
        return {"status": "skipped", "reason": f"{config.attention_backend} needs a CUDA GPU"}
    if device == "cpu" and config.attention_backend == "flex":
        return {"status": "skipped", "reason": "torch's flex attention has no backward on the CPU"}
    missing = [pip for module, pip in config.needs() if importlib.util.find_spec(module) is None]
    if missing and not smoke:  # the smoke run exercises the fallbacks instead
        from models.attention import FlashAttnBackend  # flash-attn is not in requirements-gpu.txt
        from models.kernels import GPU_EXTRAS_HINT

        hints = sorted(
            {FlashAttnBackend.install if pip == "flash-attn" else GPU_EXTRAS_HINT for pip in missing}
        )
        return {"status": "skipped", "reason": f"{', '.join(missing)} not installed ({'; '.join(hints)})"}
    notes = []
    model = build_model(config, preset, vocab_size, seq_len, device)
    unavailable = getattr(getattr(model, "attention_backend", None), "unavailable", None)
    if unavailable:  # the model would run sdpa instead: never measured under the kernel's name
        return {"status": "skipped", "reason": unavailable}
    kernels = dict(model.kernels.names) if config.impl == "ours" else {}
    fell_back = sorted(k for k, v in kernels.items() if v != "liger" and _wants_liger(config, k))
    if fell_back:
        reason = liger_unavailable_reason() or "Liger Kernel unavailable"
        if not smoke:
            return {"status": "skipped", "reason": reason}
        notes.append(f"{', '.join(fell_back)} fell back ({reason})")
    if config.compile:
        torch._dynamo.reset()
        compile_model(model, backend=compile_backend)
        if compile_backend != "inductor":
            notes.append(f"compile backend {compile_backend}")
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=config.fused_adamw or None
    )
    g = torch.Generator(device="cpu").manual_seed(1234)
    batches = [torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device) for _ in range(2)]
    position_ids = document_positions(batch_size, seq_len, g).to(device) if config.documents else None
    use_cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda)  # fp32 on the CPU smoke run

    def step(ids: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = model(input_ids=ids, labels=ids, position_ids=position_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    losses = [step(batches[i % 2]) for i in range(warmup)]
    sync()
    warmup_s = time.perf_counter() - start
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses += [step(batches[i % 2]) for i in range(steps)]
    sync()
    elapsed = time.perf_counter() - start
    losses_f = [float(x) for x in losses]
    if not all(map(_finite, losses_f)):
        return {"status": "failed", "reason": f"non-finite loss {losses_f}"}
    return {
        "status": "ok",
        "tokens_per_s": steps * batch_size * seq_len / elapsed,
        "step_s": elapsed / steps,
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None,
        "loss_first": losses_f[0],
        "loss_last": losses_f[-1],
        "kernels": kernels,
        "notes": "; ".join(notes),
    }


def document_positions(batch_size: int, seq_len: int, generator: Any) -> Any:
    """Position ids of rows packed with documents of DOCUMENT_MEAN_TOKENS tokens on average (exponential
    lengths, at least 16 tokens): they restart at 0 where a document starts, as the pretraining data gives them."""
    import torch

    rows = []
    for _ in range(batch_size):
        pieces, filled = [], 0
        while filled < seq_len:
            length = int(torch.empty(1).exponential_(1 / DOCUMENT_MEAN_TOKENS, generator=generator)) + 16
            length = min(length, seq_len - filled)
            pieces.append(torch.arange(length))
            filled += length
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


def _wants_liger(config: BenchConfig, switch: str) -> bool:
    value = getattr(config, switch)
    return value == "liger" if switch == "fused_cross_entropy" else bool(value)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def probe_device(device: str, smoke: bool) -> dict[str, Any]:
    """The device's name, its datasheet bf16 peak (training/metrics.py's table) and its measured matmul peak.

    Run in a subprocess like the rows, so the driver process never holds a CUDA context.
    """
    import torch

    from training.metrics import peak_flops_per_device

    if device == "cpu":
        name, datasheet = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None
    else:
        name, datasheet = torch.cuda.get_device_name(0), peak_flops_per_device(torch.device("cuda", 0))
    return {
        "status": "ok",
        "device": name,
        "datasheet_peak_flops": datasheet,
        "matmul_peak_flops": measure_matmul_peak(device, smoke),
    }


def measure_matmul_peak(device: str, smoke: bool) -> float:
    """Best dense matmul FLOP/s over a few timed loops: bf16 8192^3 on a GPU, fp32 512^3 on the CPU."""
    import torch

    n, dtype, iters = (512, torch.float32, 4) if device == "cpu" else (8192, torch.bfloat16, 50)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(2 if smoke else 5):
        for _ in range(3):
            a @ b  # warm up clocks and the kernel choice
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


def worker_main(job: dict[str, Any]) -> None:
    """Run one job in this (fresh) process and print its result as one JSON line."""
    print(RESULT_PREFIX + json.dumps(run_job(job)), flush=True)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    if job["smoke"]:
        # The smoke run checks that the script works, not the CPU; one thread avoids oversubscribing a
        # shared machine, which made steps a hundred times slower.
        torch.set_num_threads(1)
    if job["kind"] == "probe":
        return probe_device(job["device"], job["smoke"])
    config = CONFIG_BY_NAME[job["config"]]
    try:
        return run_one(
            config,
            preset=job["preset"],
            vocab_size=job["vocab_size"],
            batch_size=job["batch_size"],
            seq_len=job["seq_len"],
            warmup=job["warmup"],
            steps=job["steps"],
            device=job["device"],
            smoke=job["smoke"],
            compile_backend=job["compile_backend"],
        )
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom", "reason": f"CUDA out of memory at batch {job['batch_size']}"}
    except Exception as e:  # a failing row must not end the run; the table says what went wrong
        return {
            "status": "failed",
            "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
        }


# --------------------------------------------------------------------------------------------------
# Driver: every job in a subprocess (or in this process for the CPU smoke run), then the table
# --------------------------------------------------------------------------------------------------


def run_isolated(job: dict[str, Any], timeout: float, isolate: bool) -> dict[str, Any]:
    if not isolate:
        return run_job(job)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
    if "out of memory" in done.stderr.lower():
        return {"status": "oom", "reason": tail[0][:300]}
    return {"status": "failed", "reason": f"exit {done.returncode}: {tail[0][:300]}"}


def environment() -> dict[str, Any]:
    """Versions of what the figures depend on (the device itself comes from `probe_device`)."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
    for dist in ("transformers", "liger-kernel", "flash-attn", "xformers", "triton"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    return info


def flops_per_token(preset: str, vocab_size: int, seq_len: int) -> float:
    """PaLM training FLOPs per token of the preset (the baseline has the same matmuls)."""
    import torch

    from models.llama import Llama, ModelConfig

    with torch.device("meta"):
        model = Llama(ModelConfig.from_preset(preset, vocab_size=vocab_size, max_seq_len=max(seq_len, 128)))
    return model.flops_per_token(seq_len)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """MFU against both peaks of the row's own device run, and speed/memory ratios against the baseline row
    of the same preset, batch size and sequence length (rows kept by --append may come from other shapes)."""

    def shape(r: dict[str, Any]) -> tuple[str, int, int]:
        return r["preset"], r["batch_size"], r["seq_len"]

    base = {shape(r): r for r in rows if r["config"] == "hf" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        r["achieved_tflops"] = achieved / 1e12
        datasheet, measured = r.get("datasheet_peak_flops"), r.get("matmul_peak_flops")
        r["mfu_datasheet"] = achieved / datasheet if datasheet else None
        r["mfu_measured_peak"] = achieved / measured if measured else None
        b = base.get(shape(r))
        r["speed_vs_baseline"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        mem, base_mem = r.get("peak_memory_gib"), b.get("peak_memory_gib") if b else None
        r["memory_vs_baseline"] = mem / base_mem if mem and base_mem else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    peak = env.get("datasheet_peak_flops")
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"liger-kernel {env['liger-kernel'] or 'not installed'}, flash-attn {env['flash-attn'] or 'not installed'}, "
        f"xformers {env['xformers'] or 'not installed'}; {env['date']}.",
        f"Peaks: datasheet {_fmt(peak and peak / 1e12, '.0f', ' TFLOP/s')}, measured matmul "
        f"{_fmt(env.get('matmul_peak_flops') and env['matmul_peak_flops'] / 1e12, '.1f', ' TFLOP/s')} "
        f"({env['precision']}).",
        "",
        "| preset | configuration | batch x seq | tokens/s | x baseline | MFU (datasheet) | MFU (measured peak) "
        "| peak memory | memory x baseline | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shape = f"{r['batch_size']} x {r['seq_len']}"
        if r["status"] != "ok":
            lines.append(
                f"| {r['preset']} | {r['config']} | {shape} | {r['status']}: {r['reason']} | | | | | "
                f"| {r['description']} |"
            )
            continue
        lines.append(
            f"| {r['preset']} | {r['config']} | {shape} | {r['tokens_per_s']:,.0f} "
            f"| {_fmt(r['speed_vs_baseline'], '.2f', 'x')} | {_fmt(r['mfu_datasheet'], '.1%')} "
            f"| {_fmt(r['mfu_measured_peak'], '.1%')} | {_fmt(r['peak_memory_gib'], '.1f', ' GiB')} "
            f"| {_fmt(r['memory_vs_baseline'], '.2f', 'x')} | {r['description']}"
            f"{'; ' + r['notes'] if r.get('notes') else ''} |"
        )
    return "\n".join(lines) + "\n"


def parse_batch_sizes(values: list[str]) -> dict[str, int]:
    sizes = dict(DEFAULT_BATCH)
    for value in values:
        preset, eq, n = value.partition("=")
        if not eq or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"train_gpu.py: --batch-size expects PRESET=N (e.g. 1b=8), got {value!r}")
        sizes[preset] = int(n)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for train_gpu.json and .md")
    parser.add_argument(
        "--presets", default=None, help="comma-separated presets (default 125m,1b; smoke: tiny)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated configurations (default all: {','.join(CONFIG_BY_NAME)})",
    )
    parser.add_argument(
        "--batch-size", action="append", default=[], metavar="PRESET=N", help="micro-batch per preset"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; smoke 128)")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default 32000; smoke 512)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps, compile included (default 5; smoke 1)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 3)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration subprocess")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny CPU run that checks the script (auto without CUDA)"
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one subprocess per configuration (default: yes on a GPU, no for the CPU smoke run)",
    )
    parser.add_argument("--append", action="store_true", help="keep other rows already in OUT/train_gpu.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0

    import torch

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke and not args.cpu_smoke:
        print("train_gpu.py: no CUDA device: running the CPU smoke configuration (tiny, fp32)", flush=True)
    device = "cpu" if smoke else "cuda"
    presets = (args.presets or ("tiny" if smoke else "125m,1b")).split(",")
    names = (args.only or ",".join(CONFIG_BY_NAME)).split(",")
    unknown = [n for n in names if n not in CONFIG_BY_NAME]
    if unknown:
        print(
            f"train_gpu.py: unknown configuration(s) {unknown}; choose from {list(CONFIG_BY_NAME)}",
            file=sys.stderr,
        )
        return 2
    batch_sizes = parse_batch_sizes(args.batch_size)
    seq_len = args.seq_len or (128 if smoke else 2048)
    vocab_size = args.vocab_size or (512 if smoke else 32000)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    steps = args.steps or (3 if smoke else 20)
    compile_backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    isolate = (not smoke) if args.isolate is None else args.isolate
    from common.files import write_atomic
    from models.llama import PRESETS

    bad = [p for p in presets if p not in PRESETS]
    if bad:
        print(f"train_gpu.py: unknown preset(s) {bad}; choose from {sorted(PRESETS)}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "train_gpu.json", args.out / "train_gpu.md"
    env = environment()
    env["precision"] = "fp32" if smoke else "bf16 autocast, fp32 weights"
    rows: list[dict[str, Any]] = []
    if args.append and json_path.exists():
        previous = json.loads(json_path.read_text())
        replaced = {(p, n, batch_sizes.get(p, 1), seq_len) for p in presets for n in names}
        rows = [
            r
            for r in previous["rows"]
            if (r["preset"], r["config"], r["batch_size"], r["seq_len"]) not in replaced
        ]
    probe = run_isolated({"kind": "probe", "device": device, "smoke": smoke}, args.timeout, isolate)
    if probe["status"] != "ok":
        print(f"train_gpu.py: cannot use the {device} device: {probe.get('reason')}", file=sys.stderr)
        return 1
    env.update({k: probe[k] for k in ("device", "datasheet_peak_flops", "matmul_peak_flops")})
    print(
        f"{env['device']}: measured matmul peak {_fmt(env['matmul_peak_flops'] and env['matmul_peak_flops'] / 1e12, '.1f')} "
        f"TFLOP/s, datasheet {_fmt(env['datasheet_peak_flops'] and env['datasheet_peak_flops'] / 1e12, '.0f')} TFLOP/s",
        flush=True,
    )
    for preset in presets:
        fpt = flops_per_token(preset, vocab_size, seq_len)
        for name in names:
            config = CONFIG_BY_NAME[name]
            job = {
                "kind": "train",
                "config": name,
                "preset": preset,
                "vocab_size": vocab_size,
                "batch_size": batch_sizes.get(preset, 1),
                "seq_len": seq_len,
                "warmup": warmup,
                "steps": steps,
                "device": device,
                "smoke": smoke,
                "compile_backend": compile_backend,
            }
            started = time.perf_counter()
            result = run_isolated(job, args.timeout, isolate)
            row = {
                "preset": preset,
                "config": name,
                "description": config.description,
                "batch_size": job["batch_size"],
                "seq_len": seq_len,
                "flops_per_token": fpt,
                # this run's device and peaks, kept with the row: --append may mix runs
                **{k: env[k] for k in ("device", "datasheet_peak_flops", "matmul_peak_flops")},
                "wall_s": time.perf_counter() - started,
                **result,
            }
            rows.append(row)
            shown = (
                f"{row['tokens_per_s']:,.0f} tokens/s"
                if row["status"] == "ok"
                else f"{row['status']}: {row.get('reason', '')}"
            )
            print(f"[{preset}] {name:<12} {shown}", flush=True)
            add_ratios(rows)
            write_atomic(json_path, json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
            write_atomic(md_path, markdown(rows, env))
    print()
    print(markdown(rows, env), end="")
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
