"""Training metrics: progress bar, metrics.jsonl, optional wandb, MFU and the loss-curve plot.

Only the main process writes. wandb is optional and never allowed to stop a run: a missing package,
no network or any wandb error becomes a logged warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from common.files import write_atomic
from common.memory import peak_rss_bytes
from training.config import LoggingConfig

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets, no sparsity), matched against
# torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 6000 Ada", 364e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),  # fp16 (V100 has no bf16)
    ("T4", 65e12),  # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops_per_device(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` if given, else the table entry for this GPU, else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    log.warning("no peak-FLOPs entry for %r: MFU shows n/a (set --train.peak_flops)", name)
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident set size of this process (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


class MetricsLogger:
    """Writes metric records (dicts with a 'step') to the bar, metrics.jsonl and wandb (main process)."""

    def __init__(
        self,
        config: LoggingConfig,
        output_dir: str | Path,
        *,
        is_main: bool,
        total_steps: int,
        start_step: int,
        run_config: dict[str, Any],
    ) -> None:
        self.config = config
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not is_main:
            return
        self._truncate_after(start_step)
        if config.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if config.wandb_project:
            self.wandb = _start_wandb(config, Path(output_dir), run_config)

    def _truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run logs those steps again (a checkpoint is a clean cut)."""
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by `n` steps."""
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict[str, Any], *, bar: dict[str, str] | None = None) -> None:
        """Append one record to metrics.jsonl, send it to wandb and show `bar` figures on the progress bar."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.bar is not None and bar:
            # Redraw now: the bar already advanced to this step, and without a redraw it would show this
            # step's number with the previous record's figures until the next step.
            self.bar.set_postfix(bar, refresh=True)
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except Exception as exc:
                log.warning("wandb.log failed (%s); wandb disabled for the rest of the run", exc)
                self.wandb = None

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close the bar and wandb, and draw the loss curve."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.config.plot and self.path.exists():
            try:
                plot_loss_curve(self.path, self.path.with_name("loss_curve.png"))
            except Exception as exc:  # a plotting problem must not fail a finished run
                log.warning("could not draw the loss curve: %s", exc)
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:
                log.warning("wandb.finish failed: %s", exc)


def _start_wandb(config: LoggingConfig, output_dir: Path, run_config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        log.warning(
            "wandb_project is set but wandb is not installed (pip install wandb): not logging to wandb"
        )
        return None
    try:
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_has_api_key(wandb) else "offline")
        # Bounded waits: a slow or unreachable server must not hold the run up for long.
        settings = wandb.Settings(mode=mode, init_timeout=60)
        # The process-wide settings, not only the run's: wandb's own telemetry reads them, and with the
        # default (online) it would contact the server even for an offline run.
        wandb.setup(settings=settings)
        run = wandb.init(
            project=config.wandb_project,
            name=config.wandb_run_name or output_dir.name,
            dir=str(output_dir),
            config=run_config,
            settings=settings,
        )
    except Exception as exc:
        log.warning("wandb.init failed (%s): not logging to wandb", exc)
        return None
    if mode == "offline":
        log.info("wandb: offline run in %s (no API key); upload it later with `wandb sync`", output_dir)
    return run


def _wandb_has_api_key(wandb: Any) -> bool:
    """Whether wandb can log in without asking: WANDB_API_KEY, or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url).hostname
        return bool(host and netrc.netrc().authenticators(host))
    except Exception:  # no ~/.netrc, or one that does not parse: no key
        return False


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
    """Train loss (and validation loss, if any) against step, from metrics.jsonl, as a PNG; below it the
    downstream scores when the run evaluated any."""
    plot_loss_curves({"": metrics_path}, out_path)


def plot_loss_curves(runs: dict[str, Path], out_path: Path) -> None:
    """One column per run (titled by its key) of train and validation loss against step, from each run's
    metrics.jsonl, side by side in one PNG, written atomically. When a run logged downstream scores (`eval/`
    keys), a second row shows them: each task's accuracy and the CORE aggregate, and on a right-hand axis
    the bits per byte per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {
        title: [json.loads(line) for line in path.read_text().splitlines() if line]
        for title, path in runs.items()
    }
    downstream = any(key.startswith("eval/") for rs in records.values() for r in rs for key in r)
    rows = 2 if downstream else 1
    fig, axes = plt.subplots(rows, len(runs), figsize=(max(7.0, 4.5 * len(runs)), 4 * rows), squeeze=False)
    for column, (title, run) in enumerate(records.items()):
        ax = axes[0][column]
        train = [(r["step"], r["loss"]) for r in run if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in run if r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set(title=title, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend()
        if downstream:
            _plot_downstream(axes[1][column], run)
    fig.tight_layout()
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def _plot_downstream(ax: Any, records: list[dict[str, Any]]) -> None:
    """Each task's accuracy and CORE against step; bits per byte per source on a second axis."""
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("eval/")))
    accuracies = [k for k in keys if k.endswith("/accuracy")]
    for key in accuracies:
        ax.plot(*zip(*_series(records, key)), "o-", label=key.split("/")[1], linewidth=1, markersize=3)
    if "eval/core" in keys:
        ax.plot(
            *zip(*_series(records, "eval/core")), "o-", label="CORE (centered)", linewidth=2.5, color="black"
        )
    ax.set(title="downstream", xlabel="step", ylabel="accuracy (CORE: centered)")
    ax.grid(alpha=0.3)
    sources = [k for k in keys if k.startswith("eval/bpb/")]
    if sources:
        right = ax.twinx()
        for offset, key in enumerate(sources):  # colours after the accuracies': one colour per line
            right.plot(
                *zip(*_series(records, key)),
                "s--",
                label=f"bpb {key.split('/', 2)[2]}",
                linewidth=1,
                color=f"C{(len(accuracies) + offset) % 10}",
            )
        right.set_ylabel("bits per byte")
        right.legend(loc="upper right", fontsize="small")
    if accuracies or "eval/core" in keys:
        ax.legend(loc="upper left", fontsize="small")
