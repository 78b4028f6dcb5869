"""See what preference tuning will train on (any `--data.key value` overrides the run config's `data:`):

    python dataset/preference_preview.py --config configs/dpo/demo.yaml

prints the data report (malformed, empty, identical and truncated pairs with file:line, the length bias)
and the first pairs' two sequences with their trained tokens marked (⟦...⟧, or green on a terminal). The
pairs are prepared (dataset/preference_prepare.py) into `data.cache_dir`, or a temporary folder, and
streamed as training will stream them (dataset/preference_stream.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from jsonargparse.typing import NonNegativeInt

from common import IGNORE_INDEX
from dataset.chat_preview import preview_loaders, run_preview
from dataset.chat_template import show_trained
from dataset.preference_prepare import PreferenceDataConfig, format_report, prepare_preference_data
from dataset.preference_stream import build_preference_loaders


@dataclass
class ShowConfig:
    """What the preview prints (the `show:` options of `python dataset/preference_preview.py`)."""

    samples: NonNegativeInt = 2
    """Pairs printed in full, trained tokens marked."""
    max_records: NonNegativeInt = 0
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
    """Prepare the pairs; print the report and the first pairs, chosen then rejected."""
    options = config.show
    with preview_loaders(
        config.data,
        config.init,
        options.max_records,
        prepare_preference_data,
        format_report,
        build_preference_loaders,
    ) as (tokenizer, train, _):
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


def main(argv: list[str] | None = None) -> int:
    return run_preview(PreviewConfig, preview, "dataset/preference_preview.py", argv)


if __name__ == "__main__":
    sys.exit(main())
