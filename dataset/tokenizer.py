"""The project's tokenizer: a SentencePiece BPE model plus its exact Hugging Face twin.

A tokenizer folder (TOKDIR) holds

- `tokenizer.model`: the SentencePiece model; `Tokenizer` below encodes with it,
- `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`: a Hugging Face fast tokenizer that
  `transformers.AutoTokenizer.from_pretrained(TOKDIR)` loads with no custom code and that gives the same
  ids as the SentencePiece model (see `build_hf_tokenizer` for why it is built by hand).

`Tokenizer.encode` is the one function the rest of the project uses to turn text into ids. It is safe:
text that spells a control token ("<s>", "</s>", "<pad>", "<unk>", "<|user|>", ...) is encoded as plain
text, because SentencePiece never matches control symbols in its input. It is also lossless:
`decode(encode(x)) == x` for every string (see `_encode_plain` for the one character that needs care).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from common.files import write_atomic
from dataset.chat_template import CHAT_TEMPLATE, ROLE_TOKENS

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, then the role tokens from 4 on.
CONTROL_TOKENS: list[str] = [BOS, EOS, PAD, *ROLE_TOKENS.values()]
SP_MODEL_FILE = "tokenizer.model"
DEFAULT_MODEL_MAX_LENGTH = 2048

# SentencePiece writes a space as U+2581 and decodes every U+2581 back to a space.
WS_MARKER = "\u2581"
_Piece = sp_pb2.ModelProto.SentencePiece


class Tokenizer:
    """SentencePiece BPE tokenizer with safe, lossless `encode` (see the module docstring)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self.sp = processor
        self.path = path
        self.vocab_size: int = processor.get_piece_size()
        self.unk_id: int = processor.unk_id()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.pad_id: int = processor.pad_id()
        self.role_ids: dict[str, int] = {
            role: processor.piece_to_id(tok) for role, tok in ROLE_TOKENS.items()
        }
        for name, token in [("bos", BOS), ("eos", EOS), ("pad", PAD), *ROLE_TOKENS.items()]:
            token_id = processor.piece_to_id(token)
            if token_id == self.unk_id or not processor.is_control(token_id):
                raise ValueError(
                    f"{path or 'SentencePiece model'}: {token!r} ({name}) is not a control symbol; "
                    "train the tokenizer with dataset/train_tokenizer.py"
                )
        # A literal U+2581 in text is encoded as its UTF-8 bytes (byte-fallback pieces) so it decodes to itself.
        self._ws_marker_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in WS_MARKER.encode()]

    @classmethod
    def load(cls, tokdir: str | Path) -> Tokenizer:
        """Load the tokenizer folder written by `dataset/train_tokenizer.py`."""
        model_file = Path(tokdir) / SP_MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: no SentencePiece model (is {tokdir} a tokenizer folder?)")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{model_file}: not a SentencePiece model ({exc})") from exc
        return cls(processor, Path(tokdir))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def _encode_plain(self, text: str) -> list[int]:
        # SentencePiece turns spaces into U+2581 before encoding, so a U+2581 already in the text would come
        # back as a space. Encoding it as bytes instead keeps decode(encode(x)) == x; a byte piece never
        # merges with its neighbours, so the text on each side is encoded exactly as on its own.
        if WS_MARKER not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for index, part in enumerate(text.split(WS_MARKER)):
            if index:
                ids.extend(self._ws_marker_ids)
            ids.extend(self.sp.encode(part))
        return ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text` as plain text (control-token strings included), optionally framed by <s> ... </s>."""
        ids = self._encode_plain(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """`encode` for many texts; `num_threads` > 1 lets SentencePiece encode them in parallel."""
        plain = [i for i, text in enumerate(texts) if WS_MARKER not in text]
        batch = self.sp.encode([texts[i] for i in plain], num_threads=num_threads) if plain else []
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, batch):
            out[i] = ids
        for i, text in enumerate(texts):
            if WS_MARKER in text:
                out[i] = self._encode_plain(text)
        if bos or eos:
            out = [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in out]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control ids (<s>, </s>, <pad>, role tokens) are dropped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


def token_byte_lengths(tokenizer: Tokenizer) -> list[int]:
    """The UTF-8 length of each token id's text, one entry per id (`vocab_size` of them): how much of the
    corpus a token stands for, for bits per byte (`training.objectives.CausalLMObjective(token_bytes=...)`).

    A normal piece counts its text with U+2581 as the one-byte space it decodes to; a byte-fallback piece
    `<0xNN>` is one byte; control tokens (<s>, </s>, <pad>, role tokens) stand for no text and count 0, as
    does <unk>, which `encode` never produces (byte fallback spells every character)."""
    sp = tokenizer.sp
    lengths: list[int] = []
    for token_id in range(tokenizer.vocab_size):
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            lengths.append(0)
        elif sp.is_byte(token_id):
            lengths.append(1)
        else:
            lengths.append(len(sp.id_to_piece(token_id).replace(WS_MARKER, " ").encode()))
    return lengths


# --- Hugging Face export -------------------------------------------------------------------------------


def build_hf_tokenizer(model_proto: bytes):
    """A `tokenizers.Tokenizer` that gives the same ids as the SentencePiece BPE model `model_proto`.

    transformers' own conversion of `tokenizer.model` is not used: it rewrites whitespace runs and, for
    `LlamaTokenizer(vocab_file=...)`, can silently build a tiny vocabulary. Here the pieces become a BPE
    vocabulary with the same ids, and the merges are derived from the vocabulary exactly as SentencePiece
    applies them: SentencePiece BPE merges any two adjacent symbols whose concatenation is a piece, best
    piece score first (score = -rank for BPE), leftmost first on ties. So every split `left + right` of a
    normal piece, both halves normal pieces, is a merge ranked by the merged piece's id; tokenizers' BPE also
    picks the lowest rank, leftmost first. SentencePiece does not pre-split text at encode time (its
    whitespace/script/digit splitting only restricts which pieces training may create, so no piece crosses
    those boundaries and no merge can either), so there is no pre-tokenizer. (Splitting before runs of
    spaces would be exact too, but measured slower.) Characters outside the vocabulary become `<0xXX>`
    byte pieces on both sides (byte fallback).
    """
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise ValueError("only SentencePiece BPE models can be exported")
    if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.remove_extra_whitespaces:
        raise ValueError("the export expects add_dummy_prefix=False and remove_extra_whitespaces=False")

    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    normal = {piece.piece: index for index, piece in enumerate(proto.pieces) if piece.type == _Piece.NORMAL}
    ranked = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((index, normal[left], normal[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    tokenizer = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True, dropout=None)
    )
    steps = []
    if proto.normalizer_spec.name not in ("identity", ""):
        # e.g. "nfkc": SentencePiece's own compiled rules, which tokenizers can run as they are.
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    steps.append(normalizers.Replace(" ", WS_MARKER))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(WS_MARKER, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = [p.piece for p in proto.pieces if p.type in (_Piece.CONTROL, _Piece.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in specials])
    # Like Llama: tokenizer(text) starts with <s>; add_special_tokens=False gives Tokenizer.encode's ids.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer


def write_hf_files(tokdir: str | Path, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
    """Write the Hugging Face files next to `TOKDIR/tokenizer.model` (each file atomically)."""
    tokdir = Path(tokdir)
    model_proto = (tokdir / SP_MODEL_FILE).read_bytes()
    hf_tokenizer = build_hf_tokenizer(model_proto)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    roles = list(ROLE_TOKENS.values())
    special_tokens = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        # PreTrainedTokenizerFast (TokenizersBackend in transformers 5) loads tokenizer.json as it is,
        # unlike LlamaTokenizer(Fast), which rebuilds the pipeline from the vocabulary.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens,
        "additional_special_tokens": roles,
        # What the tokenizer does, for readers that do not run tokenizer.json and would guess otherwise
        # (docs/export.md): <s> first, no </s>, and no space put before the text. llama.cpp's converter
        # (convert_hf_to_gguf.py) takes add_prefix_space as its `tokenizer.ggml.add_space_prefix`, which
        # llama.cpp assumes true for a SentencePiece vocabulary when absent; transformers' LlamaTokenizer
        # also prepends a space unless told. `legacy: false` asks loaders that still read it for the
        # non-legacy Llama handling of text after special tokens.
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": proto.normalizer_spec.add_dummy_prefix,
        "legacy": False,
        "model_max_length": model_max_length,
        # Any clean-up would break decode(encode(x)) == x (e.g. " ." -> ".").
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    write_atomic(tokdir / "tokenizer.json", hf_tokenizer.to_str(pretty=False))
    write_atomic(tokdir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {**special_tokens, "additional_special_tokens": roles}
    write_atomic(tokdir / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
