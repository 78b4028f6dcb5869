"""Preference pairs, prepared once: sources -> (prompt, chosen, rejected) -> ids -> shuffled shards -> rows.

A record is `{"prompt", "chosen", "rejected"}`:

- `prompt`: a string (one user message), or a conversation in messages form ending with a user message
  (`[{"role": "system" | "user" | "assistant", "content": ...}, ...]`);
- `chosen` / `rejected`: a string, an assistant message `{"role": "assistant", "content": ...}`, or a list
  of messages ending with one, the earlier ones being the prompt (TRL's conversational forms, e.g.
  UltraFeedback's).

Sources are those of instruction data (dataset/chat_sources.py): jsonl, JSON arrays or parquet, plain or
compressed, globs, folders, NAME=PATTERN, or hf:DATASET[@CONFIG][:SPLIT].

Each pair becomes two sequences that share the prompt: the prompt goes through the chat template once
(`<s>... <|assistant|>`, as for generation) and each answer is encoded on its own and closed with `<|end|>`;
the ids are joined, never re-tokenised as one string, so there is one `<s>` and one end token, and the
sequences are exactly what `render_chat(prompt + [answer])` gives. The trained tokens (whose
log-probabilities preference tuning sums) are the answer's tokens and its `<|end|>`; `<s>`, role tokens,
system and user text and earlier assistant turns never are.

A row holds whole pairs: the chosen sequence, then the rejected one, with positions restarting at each, so
neither attends to the other (several pairs per row with `packing: best_fit`, one with `pad`). So a pair
must fit in `seq_len` twice over its prompt; longer pairs are truncated (counted in the report):

1. the oldest exchanges of the prompt are dropped (keeping `<s>`, the system message and the last user
   turn), as few as needed;
2. then both answers are cut to share what room is left (the longer one first); a cut answer loses its
   `<|end|>`;
3. a pair left with no answer token, or with two identical answers, is dropped.

Before training every pair is checked and the report says, per source, how many were malformed (with
file:line and why), had an empty answer, had identical answers, or were truncated to nothing, and how long
chosen answers are against rejected ones (a length bias the loss may learn instead of quality).
The held-out split (`validation_fraction`) is chosen by a hash of each record, or comes from
`validation_files`. Everything else (shuffled shards, the rebuild when an input changes, the per-source
order, mixing, packing, exact resume) is instruction tuning's (dataset/chat_data.py, chat_dataset.py).

Preview what will be trained:  python dataset/preference_data.py --config configs/dpo/demo.yaml
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python dataset/preference_data.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import orjson
import torch

from common import IGNORE_INDEX
from common.randomness import mix_seed, name_seed
from data.shard_io import ShardError
from dataset.chat_data import (
    MAX_EXAMPLES,
    PreparedData,
    ShardWriter,
    Shuffler,
    prepare_folder,
    prepared_fingerprint,
    trained_spans,
)
from dataset.chat_dataset import ChatLoader, ChatStream, ChatUnitRequest, build_chat_loaders, find_tokenizer
from dataset.chat_sources import ChatSource, Messages, iter_raw_records, parse_sources
from dataset.chat_template import (
    ChatTokenizer,
    RenderedChat,
    check_messages,
    render_chats,
    show_trained,
)
from dataset.document_order import Unit
from dataset.mixing import check_weights
from dataset.text_units import is_held_out

PREPARED_VERSION = 1
CHUNK = 512  # pairs rendered per encode_batch call


@dataclass
class PreferenceDataConfig:
    """Preference pairs and how they become batches (the `data:` section of a preference-tuning run)."""

    files: list[str] = field(default_factory=list)
    """Sources: files, globs or folders (jsonl, JSON array, parquet; plain or compressed), NAME=PATTERN to
    name a source, or hf:DATASET[@CONFIG][:SPLIT]. Records are {"prompt", "chosen", "rejected"}."""
    tokenizer: str = ""
    """Tokenizer folder; empty = the tokenizer of the --init model."""
    mixture: dict[str, float] = field(default_factory=dict)
    """Share of pairs' tokens per source name, e.g. {helpful: 2, safe: 1}; empty = natural proportions."""
    seq_len: int = 1024
    """Tokens per row. A row holds whole pairs: prompt + chosen, then prompt + rejected."""
    batch_size: int = 4
    """Rows per batch on each device (the micro-batch); a row holds one pair or more."""
    packing: str = "best_fit"
    """best_fit: several pairs per row; pad: one pair per row, each batch padded to its longest row.
    Both give the same loss."""
    pack_block: int = 1024
    """Pairs arranged together: best-fit packs (or pad groups by length) within a block."""
    seed: int = 0
    """Seed of the shuffles (preparation, order, packing)."""
    validation_files: list[str] = field(default_factory=list)
    """Held-out sources (same forms as files) for the validation metrics."""
    validation_fraction: float = 0.0
    """Hold out this fraction of the pairs (chosen by a hash of each record) instead; used when
    validation_files is empty."""
    cache_dir: str = ""
    """Where the prepared pairs go; empty = <train.output_dir>/data."""
    num_workers: int = 0
    """Processes that read prepared shards (0 = in the main process). Does not change the data."""
    pin_memory: bool = False
    """Return batches in pinned memory (faster copies to a GPU)."""

    def __post_init__(self) -> None:
        for name in ("files", "validation_files"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        checks = [
            (self.packing in ("best_fit", "pad"), "packing must be best_fit or pad"),
            (self.seq_len >= 8, "seq_len must be >= 8"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.pack_block >= 1, "pack_block must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (0.0 <= self.validation_fraction < 1.0, "validation_fraction must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.mixture = check_weights(self.mixture)


# ---------------------------------------------------------------------------------------------------
# Records


class PairError(ValueError):
    """A record that cannot be trained on; `kind` is the report's column: malformed, empty or identical."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Pair:
    """A checked preference pair."""

    prompt: Messages
    chosen: str
    rejected: str


def _answer(record: Mapping[str, Any], key: str, prompt: Any) -> str:
    """The answer text of `record[key]`: a string, an assistant message, or a conversation whose last
    message is the assistant's answer and whose earlier messages are the prompt (TRL's implicit-prompt
    form, as in UltraFeedback)."""
    value = record.get(key)
    if isinstance(value, list) and value:
        *before, value = value
        if before:
            as_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if [(m.get("role"), m.get("content")) for m in before if isinstance(m, Mapping)] != [
                (m.get("role"), m.get("content")) for m in as_messages if isinstance(m, Mapping)
            ]:
                raise PairError("malformed", f"{key!r} is a conversation that does not start with the prompt")
    if isinstance(value, Mapping):
        if value.get("role") != "assistant":
            raise PairError(
                "malformed", f"{key!r} ends with role {value.get('role')!r}, not an assistant answer"
            )
        value = value.get("content")
    if not isinstance(value, str):
        what = "missing" if value is None else f"{type(value).__name__}"
        raise PairError(
            "malformed", f"{key!r} is {what}; expected a string or an assistant message {{role, content}}"
        )
    return value


def to_pair(record: Any) -> Pair:
    """The pair of one record (module docstring), or a PairError saying what is wrong."""
    if not isinstance(record, Mapping):
        raise PairError("malformed", f"expected an object, found {type(record).__name__}")
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        found = ", ".join(sorted(map(str, record))) or "none"
        raise PairError("malformed", f"missing {', '.join(missing)} (fields found: {found})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    chosen, rejected = _answer(record, "chosen", prompt), _answer(record, "rejected", prompt)
    if not chosen.strip() or not rejected.strip():
        raise PairError("empty", f"the {'chosen' if not chosen.strip() else 'rejected'} answer is empty")
    if chosen == rejected:
        raise PairError("identical", "chosen and rejected are the same answer")
    if not isinstance(prompt, list):
        raise PairError("malformed", f"'prompt' is {type(prompt).__name__}; expected a string or messages")
    try:
        checked = check_messages([*prompt, {"role": "assistant", "content": chosen}])
    except ValueError as exc:
        raise PairError("malformed", f"prompt: {exc}") from None
    if len(checked) < 2 or checked[-2]["role"] != "user":
        raise PairError("malformed", "the prompt must end with a user message")
    return Pair(checked[:-1], chosen, rejected)


# ---------------------------------------------------------------------------------------------------
# Ids and truncation


@dataclass
class FittedPair:
    """A pair's two sequences within the row length, and what truncation did."""

    chosen: list[int]
    """<s>, the prompt, the chosen answer and its <|end|> (unless cut)."""
    rejected: list[int]
    prompt_length: int
    """Tokens of the (possibly shortened) prompt, the same at the start of both sequences."""
    prompt_turns_dropped: bool
    answers_cut: bool

    def line(self, pair_id: int, origin: str) -> bytes:
        """The prepared record: both sequences as one id list, the trained spans, where the rejected one
        starts, the pair's id in the prepared folder and where it came from."""
        ids = self.chosen + self.rejected
        trained = [i >= self.prompt_length for i in range(len(self.chosen))]
        trained += [i >= self.prompt_length for i in range(len(self.rejected))]
        return orjson.dumps(
            {
                "ids": ids,
                "train": trained_spans(trained),
                "split": len(self.chosen),
                "pair": pair_id,
                "origin": origin,
            }
        )


def fit_pair(prompt: RenderedChat, chosen: list[int], rejected: list[int], seq_len: int) -> FittedPair | None:
    """The pair's sequences (`prompt` rendered with the generation prompt; each answer's ids ending in
    <|end|>) within a row of `seq_len` by the truncation policy (module docstring); None when no answer
    token is left or the answers became identical."""
    ids = prompt.ids

    def need(prompt_length: int) -> int:
        return 2 * prompt_length + len(chosen) + len(rejected)

    dropped = False
    if need(len(ids)) > seq_len:
        first = 1 if prompt.roles[0] == "system" else 0
        keep_head = prompt.starts[first]  # <s> and the system prompt
        # An exchange starts at a user message after a non-user one; the last one always stays.
        cuts = [
            m
            for m in range(first + 1, len(prompt.roles))
            if prompt.roles[m] == "user" and prompt.roles[m - 1] != "user"
        ]
        for m in cuts:
            shortened = ids[:keep_head] + ids[prompt.starts[m] :]
            dropped = True
            if need(len(shortened)) <= seq_len or m == cuts[-1]:
                ids = shortened
                break
    room = seq_len - 2 * len(ids)
    cut = len(chosen) + len(rejected) > room
    if cut:
        if room < 2:
            return None
        half = room // 2
        if len(chosen) <= half:
            rejected = rejected[: room - len(chosen)]
        elif len(rejected) <= half:
            chosen = chosen[: room - len(rejected)]
        else:
            chosen, rejected = chosen[:half], rejected[: room - half]
        if chosen == rejected:
            return None
    return FittedPair(ids + chosen, ids + rejected, len(ids), dropped, cut)


def encode_pairs(tokenizer: ChatTokenizer, pairs: Sequence[Pair], *, num_threads: int = 1) -> list[tuple]:
    """(rendered prompt, chosen ids, rejected ids) of each pair: the prompt through the chat template with
    the generation prompt, each answer encoded alone and closed with <|end|>."""
    prompts = render_chats(
        tokenizer, [p.prompt for p in pairs], add_generation_prompt=True, num_threads=num_threads
    )
    answers = tokenizer.encode_batch(
        [text for p in pairs for text in (p.chosen, p.rejected)], num_threads=num_threads
    )
    end = tokenizer.role_ids["end"]
    return [(prompt, [*answers[2 * i], end], [*answers[2 * i + 1], end]) for i, prompt in enumerate(prompts)]


# ---------------------------------------------------------------------------------------------------
# Preparing


@dataclass
class PairSourceReport:
    """What preparing one source found; the numbers of the data report."""

    spec: str
    records: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    empty: int = 0
    identical: int = 0
    truncated_to_nothing: int = 0
    held_out: int = 0
    kept: int = 0
    prompt_turns_dropped: int = 0
    answers_cut: int = 0
    tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    chosen_longer: int = 0
    longest: int = 0


class _PairIds:
    """Ids unique within a prepared folder (the key of a cached reference log-probability)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def prepare_preference_data(
    config: PreferenceDataConfig,
    tokenizer: ChatTokenizer,
    tokenizer_dir: str | Path,
    cache_dir: str | Path,
    *,
    max_records: int = 0,
    log: Any = print,
) -> PreparedData:
    """Prepare `config`'s sources into `cache_dir`, or reuse it when up to date (as prepare_chat_data)."""
    cache_dir = Path(cache_dir)
    sources = parse_sources(config.files)
    if not sources:
        raise ValueError("no preference data: set data.files")
    validation = parse_sources(config.validation_files) if config.validation_files else []
    fingerprint = _fingerprint(config, sources, validation, Path(tokenizer_dir), max_records)

    def build(tmp: Path) -> dict[str, Any]:
        fraction = 0.0 if validation else config.validation_fraction
        ids = _PairIds()
        report: dict[str, Any] = {
            "version": PREPARED_VERSION,
            "fingerprint": fingerprint,
            "seq_len": config.seq_len,
        }
        report["sources"] = {
            s.name: asdict(_prepare_source(s, config, tokenizer, tmp, fraction, max_records, ids, log))
            for s in sources
        }
        report["validation"] = {
            s.name: asdict(_prepare_source(s, config, tokenizer, tmp, None, max_records, ids, log))
            for s in validation
        }
        if fraction:
            report["validation"] = {
                name: {"spec": f"{fraction:.1%} of {name}", "kept": src["held_out"]}
                for name, src in report["sources"].items()
            }
        report["pairs"] = ids.next
        if not any(s["kept"] for s in report["sources"].values()):
            raise ValueError(f"no usable preference pair in {config.files}:\n{format_report(report)}")
        return report

    return prepare_folder(cache_dir, fingerprint, build, what="preference data", log=log)


def _prepare_source(
    source: ChatSource,
    config: PreferenceDataConfig,
    tokenizer: ChatTokenizer,
    tmp: Path,
    held_out_fraction: float | None,
    max_records: int,
    ids: _PairIds,
    log: Any,
) -> PairSourceReport:
    """Read, check, encode, fit and write one source (`held_out_fraction` None: a validation source)."""
    report = PairSourceReport(source.spec)
    is_validation = held_out_fraction is None
    shuffler = (
        None
        if is_validation
        else Shuffler(tmp / f".shuffle-{source.name}", mix_seed(config.seed, name_seed(source.name)))
    )
    held_out = ShardWriter(tmp / "validation", source.name)
    chunk: list[tuple[str, Pair, str]] = []

    def flush_chunk() -> None:
        encoded = encode_pairs(tokenizer, [pair for _, pair, _ in chunk])
        for (origin, _, key), (prompt, chosen, rejected) in zip(chunk, encoded):
            fitted = fit_pair(prompt, chosen, rejected, config.seq_len)
            if fitted is None:
                report.truncated_to_nothing += 1
                continue
            if held_out_fraction and is_held_out(key, held_out_fraction):
                report.held_out += 1
                held_out.add(fitted.line(ids.take(), origin))
                continue
            report.kept += 1
            report.prompt_turns_dropped += fitted.prompt_turns_dropped
            report.answers_cut += fitted.answers_cut
            chosen_answer = len(fitted.chosen) - fitted.prompt_length
            rejected_answer = len(fitted.rejected) - fitted.prompt_length
            report.tokens += len(fitted.chosen) + len(fitted.rejected)
            report.chosen_tokens += chosen_answer
            report.rejected_tokens += rejected_answer
            report.chosen_longer += chosen_answer > rejected_answer
            report.longest = max(report.longest, len(fitted.chosen) + len(fitted.rejected))
            if shuffler is None:
                held_out.add(fitted.line(ids.take(), origin))
            else:
                shuffler.add(orjson.dumps({"origin": origin, "fitted": asdict(fitted)}))
        chunk.clear()

    for origin, record, error in iter_raw_records(source):
        if max_records and report.records >= max_records:
            break
        report.records += 1
        try:
            if error is not None:
                raise PairError("malformed", error)
            pair = to_pair(record)
        except PairError as exc:
            setattr(report, exc.kind, getattr(report, exc.kind) + 1)
            if exc.kind == "malformed" and len(report.malformed_examples) < MAX_EXAMPLES:
                report.malformed_examples.append(f"{origin}: {exc}")
            continue
        key = orjson.dumps([pair.prompt, pair.chosen, pair.rejected]).decode()
        chunk.append((origin, pair, key))
        if len(chunk) == CHUNK:
            flush_chunk()
    if chunk:
        flush_chunk()
    held_out.flush()
    if shuffler is not None:
        # Ids are given in the shuffled order, when the lines are written.
        writer = ShardWriter(tmp / "train", source.name)
        for line in shuffler.drain():
            shuffled = orjson.loads(line)
            writer.add(FittedPair(**shuffled["fitted"]).line(ids.take(), shuffled["origin"]))
        writer.flush()
        (tmp / f".shuffle-{source.name}").rmdir()
    log(f"prepared {source.name}: {_summary(asdict(report))}")
    return report


def _fingerprint(
    config: PreferenceDataConfig,
    sources: list[ChatSource],
    validation: list[ChatSource],
    tokenizer_dir: Path,
    max_records: int,
) -> str:
    return prepared_fingerprint(
        sources,
        validation,
        tokenizer_dir,
        version=PREPARED_VERSION,
        seq_len=config.seq_len,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        max_records=max_records,
    )


# ---------------------------------------------------------------------------------------------------
# The report as text


def _summary(source: dict[str, Any]) -> str:
    parts = [f"{source['records']:,} records", f"{source['kept']:,} kept"]
    for key, what in [
        ("malformed", "malformed"),
        ("empty", "with an empty answer"),
        ("identical", "with identical answers"),
        ("truncated_to_nothing", "truncated to nothing"),
        ("held_out", "held out"),
        ("prompt_turns_dropped", "lost their oldest turns"),
        ("answers_cut", "had their answers cut"),
    ]:
        if source.get(key):
            parts.append(f"{source[key]:,} {what}")
    if source.get("kept"):
        parts.append(f"{source['tokens']:,} tokens, longest pair {source['longest']:,}")
        parts.append(_length_bias(source))
    return ", ".join(parts)


def _length_bias(source: Mapping[str, Any]) -> str:
    ratio = source["chosen_tokens"] / max(source["rejected_tokens"], 1)
    longer = source["chosen_longer"] / max(source["kept"], 1)
    return f"chosen/rejected answer length {ratio:.2f} (chosen longer in {longer:.0%} of pairs)"


def format_report(report: dict[str, Any]) -> str:
    """The data report as lines: per source what was read, kept, dropped and why, the length bias."""
    lines = [f"preference data (seq_len {report['seq_len']}, a pair's two sequences per row):"]
    for name, source in report["sources"].items():
        lines.append(f"  {name} ({source['spec']}): {_summary(source)}")
        lines.extend(f"    malformed: {example}" for example in source["malformed_examples"])
        if source["malformed"] > len(source["malformed_examples"]):
            lines.append(f"    ... and {source['malformed'] - len(source['malformed_examples']):,} more")
    kept = [s for s in report["sources"].values() if s.get("kept")]
    if len(kept) > 1:
        total = {
            k: sum(s[k] for s in kept) for k in ("chosen_tokens", "rejected_tokens", "chosen_longer", "kept")
        }
        lines.append(f"  all training pairs: {_length_bias(total)}")
    for name, source in report["validation"].items():
        summary = _summary(source) if "records" in source else f"{source['kept']:,} pairs"
        lines.append(f"  held out {name} ({source['spec']}): {summary}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The stream


def load_pair_unit(request: ChatUnitRequest, _state: Any = None) -> Unit:
    """A unit of prepared pairs in the unit's order: both sequences as one document, labels the ids on the
    answers, and as meta (where the rejected sequence starts, the pair's id)."""
    documents, labels, meta = [], [], []
    for line_number, obj in request.key.iter_records():
        try:
            ids, spans, split, pair = obj["ids"], obj["train"], int(obj["split"]), int(obj["pair"])
            row_labels = [IGNORE_INDEX] * len(ids)
            for start, end in spans:
                row_labels[start:end] = ids[start:end]
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{request.key.part.path}:{line_number}: not a prepared pair ({exc})") from exc
        documents.append(ids)
        labels.append(row_labels)
        meta.append((split, pair))
    order = request.key.shuffle(list(range(len(documents))))
    return Unit.build([documents[i] for i in order], [labels[i] for i in order], [meta[i] for i in order])


class PreferenceLoader(ChatLoader):
    """Batches of whole pairs. Beside input_ids, labels and position_ids (restarting at every sequence):

    - `sequence_ids` (B, T): at every trained label, 2k for the chosen and 2k + 1 for the rejected answer
      of the batch's k-th pair; -1 elsewhere;
    - `pair_ids` (P,): each pair's id in the prepared folder (the key of cached reference log-probs).
    """

    def __init__(self, stream: ChatStream, *, packing: str, **kwargs: Any):
        super().__init__(stream, packing=packing, **kwargs)
        self.position_ids = True  # the rejected sequence restarts at 0 even in a row of one pair

    def rows_to_batch(self, rows: list) -> dict[str, torch.Tensor]:
        batch = super().rows_to_batch(rows)
        positions = batch["position_ids"].clone()
        sequence_ids = torch.full_like(positions, -1)
        pair_ids = []
        for r, row in enumerate(rows):
            for seg in row.segments:
                split, pair = seg.meta
                k, end = len(pair_ids), seg.start + seg.length
                pair_ids.append(pair)
                positions[r, seg.start + split : end] = torch.arange(seg.length - split)
                sequence_ids[r, seg.start : seg.start + split] = 2 * k
                sequence_ids[r, seg.start + split : end] = 2 * k + 1
        sequence_ids[batch["labels"] == IGNORE_INDEX] = -1
        batch["position_ids"] = positions
        batch["sequence_ids"] = sequence_ids
        batch["pair_ids"] = torch.tensor(pair_ids, dtype=torch.long)
        return batch


def build_preference_loaders(
    config: PreferenceDataConfig,
    prepared: PreparedData,
    pad_id: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    rows_per_step: int | None = None,
    eval_batches: int | None = None,
    every_pair: bool = False,
) -> tuple[PreferenceLoader, PreferenceLoader | None]:
    """This rank's endless training loader and its held-out loader (None when nothing is held out):
    instruction tuning's, reading pairs.

    `every_pair`: the training loader goes once over the training pairs in file order instead (the pass
    that caches the reference's log-probabilities)."""
    return build_chat_loaders(  # type: ignore[return-value]
        config,  # type: ignore[arg-type]
        prepared,
        pad_id,
        rank=rank,
        world_size=world_size,
        rows_per_step=rows_per_step,
        eval_batches=eval_batches,
        once=every_pair,
        load_unit=load_pair_unit,
        item="pairs",
        loader_class=PreferenceLoader,
    )


# --------------------------------------------------------------------------------------------------
# Command line: the preview


@dataclass
class ShowConfig:
    """What the preview prints (the `show:` options of `python dataset/preference_data.py`)."""

    samples: int = 2
    """Pairs printed in full, trained tokens marked."""
    max_records: int = 0
    """Prepare only the first N records of each source (0: all)."""
    color: bool | None = None
    """Mark trained tokens in green (None: when printing to a terminal) instead of ⟦...⟧."""


@dataclass
class PreviewConfig:
    """The data section of a preference-tuning config (and its --init, for the tokenizer)."""

    data: PreferenceDataConfig
    show: ShowConfig = field(default_factory=ShowConfig)
    init: str = ""
    """The model the run starts from; its tokenizer is used unless data.tokenizer is set."""


def preview(config: PreviewConfig) -> None:
    """Prepare the pairs (into data.cache_dir, or a temporary folder); print the report and some pairs."""
    from dataset.tokenizer import Tokenizer

    data, options = config.data, config.show
    tokenizer_dir = find_tokenizer(data.tokenizer, config.init)
    tokenizer = Tokenizer.load(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(data.cache_dir or Path(tmp) / "data")
        prepared = prepare_preference_data(
            data, tokenizer, tokenizer_dir, cache, max_records=options.max_records
        )
        print(format_report(prepared.report))
        train, held_out = build_preference_loaders(data, prepared, tokenizer.pad_id)
        try:
            shown = 0
            for row in train.iter_rows():
                for seg in row.segments:
                    if shown == options.samples:
                        return
                    shown += 1
                    split, pair = seg.meta
                    ids = row.tokens[seg.start : seg.start + seg.length]
                    labels = row.labels[seg.start : seg.start + seg.length]
                    for name, part in (("chosen", slice(0, split)), ("rejected", slice(split, None))):
                        trained = int(np.sum(labels[part] != IGNORE_INDEX))
                        print(
                            f"\n--- pair {pair} from {seg.source}, {name}: {len(ids[part])} tokens, {trained} trained ---"
                        )
                        print(
                            show_trained(
                                tokenizer, ids[part].tolist(), labels[part].tolist(), color=options.color
                            )
                        )
        finally:
            for opened in (train, held_out):
                if opened is not None:
                    opened.close()


def main(argv: list[str] | None = None) -> int:
    from common.config import ConfigError, parse_config

    try:
        config = parse_config(
            PreviewConfig, argv, prog="dataset/preference_data.py", allow_extra_sections=True
        )
        preview(config)
    except (ValueError, OSError, ShardError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
