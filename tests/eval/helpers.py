"""Helpers for evaluation tests: tokenizers and run directories built on the fly."""

from __future__ import annotations

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GLUE_DIR = SHARED / "glue"

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts, vocab_size: int = 1024):
    """A lowercase WordPiece tokenizer trained on ``texts`` (specials get ids 0-4)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from cramkit.data.tokenizer import train_wordpiece

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # Trained as cramkit trains its own: the same tokenizer in every pytest run.
    return train_wordpiece(tok, list(texts), vocab_size=vocab_size, min_frequency=0, specials=SPECIALS)


def make_run_dir(path: Path, model_cfg, tokenizer, special_ids: dict | None = None, model=None):
    """A run directory as ``cramkit pretrain`` lays it out, holding ``model`` (or a fresh one)."""
    import torch

    from cramkit.models import build_model
    from cramkit.train.checkpoint import save_checkpoint

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model": model_cfg.to_dict()}))
    tokenizer.save(str(path / "tokenizer.json"))
    if special_ids is None:
        special_ids = {
            n: tokenizer.token_to_id(s)
            for n, s in zip(("pad", "unk", "cls", "sep", "mask"), SPECIALS)
        }
        special_ids["eod"] = None
    (path / "data_manifest.json").write_text(json.dumps({"special_ids": special_ids}))
    if model is None:
        # Not seed 0: the random-init control starts from seed 0 and must differ from this.
        torch.manual_seed(1234)
        model = build_model(model_cfg)
    save_checkpoint(path, 1, model, {"step": 1})
    return path


#: A preset shrunk to test size (export tests compare against transformers at these widths).
SMALL_MODEL = {"vocab_size": 256, "hidden": 32, "layers": 2, "heads": 4, "intermediate": 64, "max_positions": 64}


def perturbed_run(path: Path, preset: str, tokenizer, **overrides):
    """A run directory at ``path`` holding ``preset`` at :data:`SMALL_MODEL` sizes (and
    ``overrides``), every weight moved off its initial value (norms at 1 and biases at 0 would
    hide a mistake in converting them): ``(run directory, model)``."""
    import torch

    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    cfg = preset_config(preset, **{**SMALL_MODEL, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return make_run_dir(path, cfg, tokenizer, model=model.eval()), model
