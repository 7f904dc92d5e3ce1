"""Data pipeline: text sources -> tokenizer -> packed token shards -> resumable loader.

See ``docs/CONTRACTS.md`` for the interfaces other parts rely on. ``cramkit.data.prepare`` is
the module (``prepare.prepare`` / ``prepare.cached_prepare``), deliberately not shadowed here.
Names are imported lazily so ``cramkit prepare`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PrepareConfig": "config",
    "TokenDataset": "dataset",
    "ShardLoader": "loader",
    "iterate_eval": "loader",
    "SOURCE_READERS": "sources",
    "bbc_news_documents": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
