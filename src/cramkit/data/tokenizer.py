"""Normalisation and tokenizer training with Hugging Face ``tokenizers``.

The normaliser is stored inside ``tokenizer.json`` so fine-tuning and inference see exactly the
text transformation used in pretraining. WordPiece (MLM) gets ``[PAD] [UNK] [CLS] [SEP] [MASK]``
and a ``[CLS] A [SEP] (B [SEP])`` post-processor; byte-level BPE (CLM) gets ``<|endoftext|>``
(the end-of-document token) and ``<|pad|>``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from ..errors import DataError
from .config import PrepareConfig

WORDPIECE_SPECIALS = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}
BPE_SPECIALS = {"eod": "<|endoftext|>", "pad": "<|pad|>"}
SPECIAL_ROLES = ("pad", "unk", "cls", "sep", "mask", "eod")
VOCAB_MULTIPLE = 64


def build_normalizer(cfg: PrepareConfig) -> normalizers.Normalizer | None:
    """The configured normalisation as one ``tokenizers`` normaliser (None when all are off)."""
    steps: list[normalizers.Normalizer] = []
    if cfg.strip_accents and not cfg.ascii_only:
        steps += [normalizers.NFD(), normalizers.StripAccents(), normalizers.NFC()]
    if cfg.ascii_only:
        # NFKD splits accents and compatibility forms off first, so 'é' folds to 'e', not ''.
        steps += [
            normalizers.NFKD(),
            normalizers.StripAccents(),
            normalizers.Replace(Regex(r"[^\x00-\x7F]"), ""),
        ]
    if cfg.lowercase:
        steps.append(normalizers.Lowercase())
    if cfg.collapse_whitespace:
        steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else normalizers.Sequence(steps)


def _fewer_merges_hint(cfg: PrepareConfig) -> str:
    # A pair seen once may not merge at min_frequency 2 (cramming's): on a small corpus that is
    # what ends training early, and 1 lifts it.
    return f", or min_frequency=1 (now {cfg.min_frequency})" if cfg.min_frequency > 1 else ""


def normalised_length(normalizer: normalizers.Normalizer | None,
                      cfg: PrepareConfig) -> tuple[Callable[[str], int], Callable[[str], int]]:
    """``(floor, exact)``: a cheap lower bound on the normalised text's length, and the length.

    ``exact`` normalises the text again, in Python on one core, a cost next to tokenizing it on
    all cores (BENCHMARKS.md, prepare). ``floor`` lets a caller that only needs "is the length
    at least x" skip that for most documents. For a normaliser :func:`build_normalizer` builds
    without ``collapse_whitespace`` it counts ASCII characters: NFD/NFKD leave them as they are,
    accent stripping and the non-ASCII deletion touch only other characters, Lowercase maps ASCII
    to ASCII, and NFC can at most compose one with a following mark into one character. So it is
    exact for ASCII text. Any other normaliser (a tokenizer file's, or one collapsing whitespace)
    gets the floor 0.
    """
    if normalizer is None:
        return len, len

    def exact(text: str) -> int:
        return len(normalizer.normalize_str(text))

    own = build_normalizer(cfg)
    if cfg.collapse_whitespace or own is None or own.__getstate__() != normalizer.__getstate__():
        return (lambda text: 0), exact
    return (lambda text: len(text) if text.isascii() else len(text.encode("ascii", "ignore"))), exact


def id_count(tok: Tokenizer) -> int:
    """How many ids ``tok``'s tokens need: its largest id + 1.

    That is its vocabulary size for the tokenizers prepare trains; a reused file may leave ids
    unused (a token deleted, an added token at a fixed id), and then the size alone would make
    the shards' dtype and the model's embedding too small for its largest id.
    """
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def padded_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of 64 (tensor-core friendly embedding rows)."""
    return -(-n // multiple) * multiple


#: Texts longer than this many characters are trained on and encoded in pieces: tokenizers keeps
#: tens of bytes per character of a text it works on (alignments, offsets, token strings), so
#: one enormous document (a file with one line, doc_separator=file) would otherwise need many
#: times its size in memory.
PIECE_CHARS = 1 << 18


def text_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` cut into consecutive pieces of at most ``size`` characters (the whole text when it
    is no longer).

    A cut falls just before a single whitespace character that follows a non-space and precedes
    one, where the pre-tokenizers of both tokenizer kinds split anyway: WordPiece drops the space,
    and byte-level BPE starts the next word with it. So the pieces tokenize as the whole text does
    (up to a normaliser that strips each piece's ends, as collapse_whitespace does). Text with no
    such space in the second half of a piece's span is cut at ``size``.
    """
    start, n = 0, len(text)
    while n - start > size:
        end, low = start + size, start + size // 2
        cut = text.rfind(" ", low, end)
        while cut > low and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", low, cut)
        if cut <= low:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _bounded_sample(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts' first ``max_chars`` characters (the last text cut short), in pieces."""
    seen = 0
    for text in texts:
        yield from text_pieces(text[: max_chars - seen], PIECE_CHARS)
        seen += min(len(text), max_chars - seen)
        if seen >= max_chars:
            return


def _wordpiece(norm: normalizers.Normalizer | None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    if norm is not None:
        tok.normalizer = norm
    return tok


def _unlisted(tok: Tokenizer, tokens: list[str]) -> Tokenizer:
    """``tok`` with ``tokens`` kept in its vocabulary but no longer added (special) tokens, which
    text would match verbatim and decoding would skip."""
    data = json.loads(tok.to_str())
    drop = set(tokens)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in drop]
    return Tokenizer.from_str(json.dumps(data))


def train_wordpiece(tok: Tokenizer, texts: Sequence[str], *, vocab_size: int, min_frequency: int,
                    specials: list[str]) -> Tokenizer:
    """``tok`` (a WordPiece model with its normaliser and pre-tokenizer set) trained on ``texts``,
    to the same ``tokenizer.json`` in every process; ``specials`` get the first ids.

    The ``tokenizers`` trainer numbers the ``##c`` continuation tokens in the order it walks a
    hash map of words, which changes in every process, and breaks ties between equally frequent
    merges by those numbers: alone, it gave another vocabulary each time
    (huggingface/tokenizers#1794). A first training with no room for merges finds them; handed
    to the real one as special tokens, in sorted order, they are numbered right after
    ``specials`` and the rest is deterministic. They then become ordinary vocabulary again. The
    first pass costs a count of the words and their character pairs, hence ``texts`` is read
    twice.
    """
    probe = Tokenizer.from_str(tok.to_str())
    probe.train_from_iterator(texts, trainer=trainers.WordPieceTrainer(vocab_size=1, show_progress=False))
    continuations = sorted(t for t in probe.get_vocab() if t.startswith("##") and len(t) == 3)
    tok.train_from_iterator(texts, trainer=trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials + continuations,
        show_progress=False))
    return _unlisted(tok, continuations)


def train_tokenizer(texts: Iterable[str], cfg: PrepareConfig) -> Tokenizer:
    """Train the configured tokenizer on (at most ``tokenizer_sample_mb`` MB of) ``texts``.

    ``texts`` are raw: the configured normaliser is part of the tokenizer, so training, encoding
    and every later user of the saved file see the same normalisation. The same texts and
    options give the same ``tokenizer.json`` in every process (WordPiece reads its sample twice
    for that, so it holds the sample in memory). Raises DataError when the corpus cannot support
    the requested vocabulary. Byte-level BPE never has fewer than 256 + 2 tokens (its byte
    alphabet and special tokens), whatever ``vocab_size`` asks for.
    """
    sample = _bounded_sample(texts, int(cfg.tokenizer_sample_mb * 1e6))
    norm = build_normalizer(cfg)
    kind = cfg.tokenizer_kind
    n_texts = n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_texts, n_chars
        for t in sample:
            n_texts += 1
            n_chars += len(t)
            yield t

    if kind == "wordpiece":
        # Read twice (see train_wordpiece), so held in memory; byte-level BPE streams it.
        tok = train_wordpiece(_wordpiece(norm), list(counted()), vocab_size=cfg.vocab_size,
                              min_frequency=cfg.min_frequency, specials=list(WORDPIECE_SPECIALS.values()))
    else:
        # Byte-level BPE is deterministic already: its whole alphabet is given, in order.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if norm is not None:
            tok.normalizer = norm
        tok.train_from_iterator(counted(), trainer=trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=list(BPE_SPECIALS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ))
    if n_texts == 0:
        raise DataError("no documents left to train the tokenizer on (all filtered out?)")
    got = tok.get_vocab_size()
    if got < cfg.vocab_size:
        # A sample cut at tokenizer_sample_mb is not the whole corpus: more text may exist already.
        capped = n_chars >= cfg.tokenizer_sample_mb * 1e6
        more = f"raise tokenizer_sample_mb (now {cfg.tokenizer_sample_mb:g})" if capped else "add text"
        raise DataError(
            f"vocab_size={cfg.vocab_size} is larger than this corpus supports: training stopped "
            f"at {got} tokens (from {n_texts} documents in the tokenizer sample); set vocab_size "
            f"to {got} or less{_fewer_merges_hint(cfg)}, or {more}"
        )
    if kind == "wordpiece" and got > cfg.vocab_size:
        # WordPiece keeps every character of its sample, and each one's ## continuation, however
        # small vocab_size is: a corpus of many scripts or symbols outgrows it without a word.
        alphabet = sum(1 for t in tok.get_vocab() if len(t) == 1)
        warnings.warn(
            f"the tokenizer has {got} tokens, more than vocab_size={cfg.vocab_size}: the sample holds "
            f"{alphabet} distinct characters, and WordPiece keeps each of them (and its ## form). "
            "Models are sized to the tokenizer; to stay near vocab_size, fold characters "
            "(ascii_only=true or strip_accents=true) or train on text in fewer scripts", stacklevel=2)
    if kind == "wordpiece":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int | None]:
    """Role -> id for pad/unk/cls/sep/mask/eod (None where the tokenizer has no such token)."""
    out: dict[str, int | None] = {role: None for role in SPECIAL_ROLES}
    for role in SPECIAL_ROLES:
        for name in (WORDPIECE_SPECIALS.get(role), BPE_SPECIALS.get(role)):
            if name is not None and tok.token_to_id(name) is not None:
                out[role] = tok.token_to_id(name)
                break
    return out


def load_tokenizer(path) -> Tokenizer:
    """Load a ``tokenizer.json`` with a DataError naming the file on failure."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None


def encoding_copy(tok: Tokenizer) -> Tokenizer:
    """A copy for packing and fine-tuning's encoder: no post-processor (framing is the caller's
    job), no padding or truncation of its own, and special-token strings in the text are
    encoded as plain text so a document containing '[SEP]' cannot inject a separator."""
    enc = Tokenizer.from_str(tok.to_str())
    enc.post_processor = None
    # A reused tokenizer.json may enable both (sentence-transformers files pad to a fixed
    # length): its [PAD] ids would be packed as text and its max_length would cut documents.
    enc.no_padding()
    enc.no_truncation()
    enc.encode_special_tokens = True
    return enc
