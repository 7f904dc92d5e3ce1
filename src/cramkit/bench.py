"""Training-step throughput of cramkit models next to Hugging Face equivalents, in one process.

``cramkit bench`` builds each target at the same shape, runs warm-up steps (compilation
included, their seconds reported apart), then times ``--repeats`` back-to-back windows of
training steps (forward, backward, AdamW step: fused and timed with CUDA events on a GPU, plain
and timed by the wall clock on a CPU), and reports the median window's tokens/s with the range
over windows, model TFLOP/s, MFU against a matmul peak measured in the same process, and peak
memory. Targets are
``FAMILY:PRESET``: ``cramkit:crammed-bert`` is our model, ``hf-bert:bert-base`` is
``transformers.BertForMaskedLM`` with that preset's dimensions and ``hf-gpt2:gpt2-small`` is
``GPT2LMHeadModel``. FLOPs per token use one formula for every target
(docs/references.md), so the ratio of tokens/s at equal shape is what matters.

A target may carry ``,KEY=VALUE`` overrides: ``batch`` and ``seq_len`` set that target's shape,
any other key is a model field, e.g. ``cramkit:gpt2-small,seq_len=1024,document_mask=true``.
``--document-mask`` also times every cramkit target with ``document_mask=true`` right after it
(its "× ref" is then against the unmasked run), and ``--doc-len N`` puts a document boundary
after each token with probability 1/N, so documents are on average N tokens long.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .configbase import apply_overrides, did_you_mean
from .errors import ConfigError
from .models import ARCHITECTURES, build_model
from .models.config import ModelConfig
from .models.docmask import untrainable_kernel
from .models.flops import flops_per_token
from .models.presets import get_preset
from .train.device import (
    autocast,
    measure_peak_flops,
    release_memory,
    resolve_device,
    resolve_precision,
    sync,
)

# A built target: the module, loss(module, batch) (the module may be its compiled wrapper), and
# training FLOPs per token.
Built = tuple[torch.nn.Module, Callable[[torch.nn.Module, dict], torch.Tensor], float]
FAMILIES: dict[str, Callable[[ModelConfig, int, float], Built]] = {}


def family(name: str):
    def deco(fn):
        FAMILIES[name] = fn
        return fn

    return deco


@family("cramkit")
def _cramkit(cfg: ModelConfig, seq_len: int, mask_rate: float) -> Built:
    model = build_model(cfg)
    # A causal model's random batches have a target at every position (synthetic_batch).
    rate = (1.0 if cfg.causal else mask_rate) if cfg.sparse_prediction else None
    return model, lambda m, b: m(**b).loss, flops_per_token(cfg, seq_len, rate)


@family("hf-bert")
def _hf_bert(cfg: ModelConfig, seq_len: int, mask_rate: float) -> Built:
    from transformers import BertConfig, BertForMaskedLM

    from .export import HF_ACTIVATIONS

    # The preset's dropout and norm eps, not HF's defaults (0.1, 1e-12): a target names its
    # regime, and `hf-bert:bert-base,dropout=0,attention_dropout=0` is dropout-free like crammed-bert.
    hf = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                    max_position_embeddings=max(cfg.max_positions, seq_len), type_vocab_size=2,
                    hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attention_dropout,
                    layer_norm_eps=cfg.norm_eps, hidden_act=HF_ACTIVATIONS[cfg.activation],
                    attn_implementation="sdpa")
    model = BertForMaskedLM(hf)
    # BertForMaskedLM always runs its head's dense + norm transform, on every position.
    dense = cfg.replace(arch="bert", sparse_prediction=False, ffn="gelu", bias=True, head_transform=True)
    return model, lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]).loss, flops_per_token(dense, seq_len)


@family("hf-gpt2")
def _hf_gpt2(cfg: ModelConfig, seq_len: int, mask_rate: float) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    from .export import HF_ACTIVATIONS

    # The preset's GELU through HF's fused kernel: GPT2Config's default "gelu_new" is the same
    # tanh GELU written as seven elementwise operations (NewGELUActivation), which cramkit's
    # gpt2-small (nn.GELU(approximate="tanh")) does not pay, so the ratio would credit cramkit
    # with HF's slower activation. gpt2-small exports to HF with the same mapping.
    hf = GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
                    n_inner=cfg.intermediate, n_positions=max(cfg.max_positions, seq_len),
                    activation_function=HF_ACTIVATIONS[cfg.activation], layer_norm_epsilon=cfg.norm_eps,
                    attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    # GPT-2's token 50256 is outside a smaller vocabulary (transformers warns).
                    bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(hf)
    # GPT2LMHeadModel has GPT-2's layout, whatever the preset's (tiny's gated, sparse-prediction
    # BERT shape): count the FLOPs of that layout, with the head on every position.
    dense = cfg.replace(arch="gpt", sparse_prediction=False, ffn="gelu", bias=True, head_transform=False,
                        decoder_bias=False, embedding_norm=False, final_norm=True, type_vocab_size=0)
    # HF shifts labels itself; cramkit's objective shifts them beforehand.
    return model, lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss, flops_per_token(dense, seq_len)


#: The boundary token of the random batches; random content tokens are drawn from 5 upwards.
BENCH_BOUNDARY = 2
_FIRST_CONTENT_ID = 5
#: Target keys that set the run's shape rather than a model field.
_SHAPE_KEYS = ("batch", "seq_len")


@dataclass
class Target:
    """A parsed ``FAMILY:PRESET[,KEY=VALUE...]`` target."""

    spec: str
    family: str
    cfg: ModelConfig
    batch: int
    seq_len: int


def parse_target(spec: str, *, batch: int, seq_len: int) -> Target:
    """Parse ``spec``; ``batch`` and ``seq_len`` apply unless the spec overrides them."""
    head, *items = [part.strip() for part in spec.split(",")]
    fam, _, preset = head.partition(":")
    if fam not in FAMILIES:
        raise ConfigError(f"unknown bench family '{fam}'{did_you_mean(fam, FAMILIES)}; known: {', '.join(FAMILIES)}")
    fields = apply_overrides({}, items)
    known = [*_SHAPE_KEYS, *ModelConfig.help()]
    for key in fields:
        if key not in known:
            raise ConfigError(f"bench target '{spec}': unknown key '{key}'{did_you_mean(key, known)}")
    shape = {key: fields.pop(key) for key in _SHAPE_KEYS if key in fields}
    for key, value in shape.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"bench target '{spec}': {key} must be a positive integer, got {value!r}")
    data = get_preset(preset or "tiny")
    data.update(fields)
    cfg = ModelConfig.from_dict(data, path="model")
    if cfg.vocab_size <= _FIRST_CONTENT_ID:
        raise ConfigError(f"bench target '{spec}': vocab_size must be above {_FIRST_CONTENT_ID} "
                          f"(random tokens are drawn from id {_FIRST_CONTENT_ID} up), got {cfg.vocab_size}")
    if cfg.document_mask and fam in HF_ARCH:
        # The HF models attend over the whole sequence: the row would time no mask under its name.
        raise ConfigError(f"bench target '{spec}': {fam} has no document mask; --document-mask times "
                          "the cramkit targets with and without it")
    if cfg.document_mask and cfg.document_boundary_id is None:
        cfg = cfg.replace(document_boundary_id=BENCH_BOUNDARY)
    target = Target(spec, fam, cfg, shape.get("batch", batch), shape.get("seq_len", seq_len))
    # The HF families widen their position table to the sequence; cramkit's model refuses a longer
    # one, which failed the target only once its random batches (--seq-len 100000000: a minute) were made.
    if fam == "cramkit" and cfg.exceeds_positions(target.seq_len):
        raise ConfigError(f"bench target '{spec}': seq_len {target.seq_len} exceeds model.max_positions "
                          f"({cfg.max_positions}); add max_positions=N to the target, or time a shorter sequence")
    return target


@dataclass
class Result:
    target: str
    params_m: float
    batch: int
    seq_len: int
    tokens_per_s: float
    tflops: float
    mfu: float
    memory_gb: float | None  # None: not measured (CPU)
    step_ms: float
    compiled: bool
    baseline: str | None = None
    warmup_s: float | None = None  # the warm-up steps' wall seconds, compilation included
    windows_tokens_per_s: list[float] | None = None  # every timed window's; tokens_per_s is their median


def synthetic_batch(arch: str, vocab: int, batch: int, seq_len: int, mask_rate: float = 0.25, device="cpu",
                    gen: torch.Generator | None = None, doc_len: float = 0.0) -> dict:
    """Random tokens with training targets: next-token labels for a causal architecture
    (``gpt``) or masked-LM labels at a ``mask_rate`` share of positions (``bert``); with ``doc_len``, document boundaries at that
    mean spacing, which predict nothing. For timing and measuring steps, not for learning."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    tokens = torch.randint(_FIRST_CONTENT_ID, vocab, (batch, seq_len), generator=gen)
    # No boundaries (and no extra draws) unless asked, so plain benchmarks keep their batches.
    ends = torch.zeros(batch, seq_len, dtype=torch.bool)
    if doc_len > 0:
        ends = torch.rand(batch, seq_len, generator=gen) < 1.0 / doc_len
        tokens[ends] = BENCH_BOUNDARY
    tokens, ends = tokens.to(device), ends.to(device)
    if ARCHITECTURES.get(arch).causal:
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, -1] = -100
        labels[ends] = -100  # as the CLM objective: a boundary predicts nothing
    else:
        chosen = (torch.rand(batch, seq_len, generator=gen).to(device) < mask_rate) & ~ends
        labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    return {"input_ids": tokens, "labels": labels}


def bench_target(target: str, *, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device,
                 precision: str, compile: bool, mask_rate: float, peak: float, doc_len: float = 0.0,
                 baseline: str | None = None, repeats: int = 1) -> Result:
    """Time ``repeats`` windows of ``steps`` training steps of one target after ``warmup`` steps.

    ``target`` is ``FAMILY:PRESET[,KEY=VALUE...]`` (see the module docstring); ``baseline``
    names the target the table compares this one with. Rates are the median window's: one
    window of a few dozen steps moves by a few percent with clocks and co-tenants, as much as
    the ratios between targets that the table exists to show.
    """
    parsed = parse_target(target, batch=batch, seq_len=seq_len)
    cfg, batch, seq_len = parsed.cfg, parsed.batch, parsed.seq_len
    torch.manual_seed(0)
    model, loss_fn, fpt = FAMILIES[parsed.family](cfg, seq_len, mask_rate)
    model.to(device).train()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    module = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(cfg.arch, cfg.vocab_size, batch, seq_len, mask_rate, device, gen, doc_len)
               for _ in range(4)]
    # As the trainer hands batches over: a sparse-prediction model gets its targets' positions
    # with the batch, so the step does not stop to find them (nonzero() is a host-device sync).
    # Found once here, before the clock; Hugging Face models take no such input and get none.
    # Here, not at import: the trainer brings in the optimizers (pytorch_optimizer, transformers),
    # over a second of start-up for every cramkit command that builds the parser.
    from .train.trainer import locate_targets

    batches = [locate_targets(b, model) for b in batches]

    def step(i: int) -> None:
        with autocast(device, precision):
            loss = loss_fn(module, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    # Every window runs the same batches in the same order, so windows differ only by noise.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        # Back to back, synchronised once at the end: no drain between windows for the host to refill.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            for i in range(steps):
                step(i)
            end.record()
        sync(device)
        windows = [start.elapsed_time(end) / 1e3 for start, end in events]
        mem = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        windows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            windows.append(time.perf_counter() - t0)
        mem = None
    seconds = statistics.median(windows)
    tps = batch * seq_len * steps / seconds
    # Significant digits, not decimals: a CPU's model TFLOP/s (0.004) rounded to 0.0.
    return Result(target, round(params / 1e6, 2), batch, seq_len, round(tps, 1), float(f"{fpt * tps / 1e12:.4g}"),
                  round(fpt * tps / peak, 4), None if mem is None else round(mem, 2), round(seconds / steps * 1e3, 2),
                  compile, baseline, round(warmup_s, 2), [round(batch * seq_len * steps / w, 1) for w in windows])


#: The architecture each Hugging Face family builds, to pair a cramkit target with its counterpart.
HF_ARCH = {"hf-bert": "bert", "hf-gpt2": "gpt"}


def _reference(results: list[Result], i: int) -> float | None:
    """tokens/s of the row that row ``i``'s "× ref" compares with, or None when it has none.

    The row named as its baseline; a Hugging Face row is its own reference; a cramkit row is
    compared with the Hugging Face row of its architecture and of its batch × sequence shape
    (the nearest above, else the nearest below), so ``cramkit:crammed-bert hf-bert:bert-base``
    compares the two in either order. Nothing else is like for like: another model's tokens/s,
    or the same model's at another sequence length, would make a ratio of two workloads.
    """
    r = results[i]
    if r.baseline:
        for other in results:
            if other.target == r.baseline:
                return other.tokens_per_s
    families = [other.target.split(":", 1)[0] for other in results]
    if families[i] in HF_ARCH:
        return r.tokens_per_s
    try:
        arch = parse_target(r.target, batch=1, seq_len=1).cfg.arch
    except ConfigError:
        arch = None
    above = [j for j in range(i - 1, -1, -1) if families[j] in HF_ARCH]
    below = [j for j in range(i + 1, len(results)) if families[j] in HF_ARCH]
    for j in above + below:
        if HF_ARCH[families[j]] == arch and (results[j].batch, results[j].seq_len) == (r.batch, r.seq_len):
            return results[j].tokens_per_s
    return None


def _spread(r: Result) -> str:
    """The timed windows' lowest and highest tokens/s ("—" for a single window)."""
    w = r.windows_tokens_per_s or []
    return f"{min(w):,.0f}–{max(w):,.0f} ({len(w)} windows)" if len(w) > 1 else "—"


def table(results: list[Result], peak: float, device_name: str) -> str:
    """A Markdown table; "× ref" is tokens/s relative to :func:`_reference`'s row, so each cramkit
    model is compared with its Hugging Face counterpart in one run ("—" where it has none)."""
    lines = [f"device: {device_name}; measured matmul peak {peak / 1e12:.3g} TFLOP/s", "",
             "| target | params (M) | batch × seq | tokens/s | × ref | model TFLOP/s | MFU | step ms | peak mem GB "
             "| tokens/s range | warm-up s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(results):
        row_ref = _reference(results, i)
        ratio = f"{r.tokens_per_s / row_ref:.2f}" if row_ref else "—"
        lines.append(f"| {r.target}{' (compiled)' if r.compiled else ''} | {r.params_m} | {r.batch} × {r.seq_len} | "
                     f"{r.tokens_per_s:,.0f} | {ratio} | {r.tflops:.3g} | {r.mfu:.1%} | "
                     f"{r.step_ms} | {'—' if r.memory_gb is None else r.memory_gb} | {_spread(r)} | "
                     f"{'—' if r.warmup_s is None else r.warmup_s} |")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time training steps of cramkit and Hugging Face models side by side",
                       description=__doc__)
    p.add_argument("targets", nargs="*", default=["cramkit:tiny", "hf-bert:tiny"],
                   help="FAMILY:PRESET[,KEY=VALUE...] targets (families: cramkit, hf-bert, hf-gpt2; "
                        "keys: batch, seq_len or a model field; default: cramkit:tiny hf-bert:tiny)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, compilation included (default: 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed windows of --steps steps each; tokens/s is the median window's, and the "
                        "table gives their range (default: 3)")
    p.add_argument("--mask-rate", type=float, default=0.15, help="MLM targets' share (sets the sparse decoder's work; default: 0.15, "
                   "where the crammed-bert recipe trains at 0.25)")
    p.add_argument("--compile", action="store_true", help="torch.compile every target")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--document-mask", action="store_true",
                   help="also time each cramkit target with model.document_mask=true, right after it")
    p.add_argument("--doc-len", type=float, default=0.0,
                   help="mean document length in tokens of the random batches (boundary tokens "
                        "at random positions); 0 = one document per sequence, else at least 1")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run_bench)


def expand_targets(targets: list[str], document_mask: bool, *, batch: int, seq_len: int,
                   device: torch.device | None = None) -> list[tuple[str, str | None]]:
    """``(target, baseline)`` pairs to time: every target (checked now, before any timing, and
    against ``device`` when given), and with ``document_mask`` a document-masked twin after each
    cramkit target that lacks it."""
    out: list[tuple[str, str | None]] = []
    for spec in targets:
        parsed = parse_target(spec, batch=batch, seq_len=seq_len)
        out.append((spec, None))
        if document_mask and parsed.family == "cramkit" and not parsed.cfg.document_mask:
            out.append((f"{spec},document_mask=true", spec))
    for spec, _ in out if device is not None else []:
        cfg = parse_target(spec, batch=batch, seq_len=seq_len).cfg
        untrainable = untrainable_kernel(cfg.document_mask, cfg.document_mask_kernel, device)
        if untrainable:  # a setting of the target: the user's to change, as a misspelt key is
            raise ConfigError(f"bench target '{spec}': {untrainable}")
    return out


def run_bench(args: argparse.Namespace) -> int:
    # Checked before any timing: --steps 0 and --batch 0 used to divide by zero at the end.
    for flag, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--seq-len", args.seq_len, 1),
                               ("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if not (math.isfinite(args.doc_len) and args.doc_len >= 0):
        raise ConfigError(f"--doc-len must be a finite number >= 0, got {args.doc_len}")
    if 0 < args.doc_len < 1:  # a boundary after each token with probability 1/N: above 1, the same as 1
        raise ConfigError(f"--doc-len is a mean document length in tokens: 0 (one document per sequence) "
                          f"or at least 1, got {args.doc_len}")
    # A flag that every target reads is the user's mistake, not one target's failure.
    if not 0 < args.mask_rate <= 1:
        raise ConfigError(f"--mask-rate must be in (0, 1], got {args.mask_rate}")
    if args.json is not None:  # written after the first target: a folder failed only once it was timed
        json_path = Path(args.json)
        if not args.json or json_path.is_dir():
            raise ConfigError(f"--json {args.json or repr('')} is {'a folder' if args.json else 'empty'}: "
                              "name the file to write, e.g. --json bench.json")
        above = next((p for p in json_path.parents if p.exists() and not p.is_dir()), None)
        if above is not None:
            raise ConfigError(f"--json {args.json}: {above} is a file, not a folder")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device, setting="--precision")
    peak = measure_peak_flops(device, precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: list[Result] = []
    failed: list[dict] = []
    env: dict = {}
    if args.json:
        from .train.runlog import environment

        env = environment(device)

    def save() -> None:  # after every target, so a run cut short keeps what it timed
        if args.json:
            from .utils import write_json

            # Versions and commit with the numbers: a result file is read long after the run.
            write_json(args.json, {"device": name, "peak_flops": peak, "precision": precision,
                                   "environment": env, "results": [asdict(r) for r in results], "failed": failed})

    targets = expand_targets(args.targets, args.document_mask, batch=args.batch, seq_len=args.seq_len, device=device)
    for target, baseline in targets:
        try:
            results.append(bench_target(target, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                                        warmup=args.warmup, device=device, precision=precision,
                                        compile=args.compile, mask_rate=args.mask_rate, peak=peak,
                                        doc_len=args.doc_len, baseline=baseline, repeats=args.repeats))
            print(f"{target}: {results[-1].tokens_per_s:,.0f} tokens/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - one target's OOM or compile error ends only that target
            failed.append({"target": target, "baseline": baseline, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            print(f"{target}: failed: {failed[-1]['error']}", file=sys.stderr, flush=True)
        finally:  # the next target starts from an empty cache, and its own compiled graphs
            if args.compile:
                torch.compiler.reset()
            release_memory()
        save()
    print(table(results, peak, name))
    for f in failed:
        print(f"| {f['target']} | failed: {f['error']} |")
    save()
    return 1 if failed else 0
