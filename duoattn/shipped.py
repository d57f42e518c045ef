"""Patterns shipped with the package, in ``patterns/<model name>/`` at the repository root."""

from __future__ import annotations

from pathlib import Path

PATTERNS_DIR = Path(__file__).resolve().parent.parent / "patterns"


def shipped_pattern_dir(model_name: str) -> Path:
    """The directory of the pattern shipped for ``model_name``; a clear error if there is none."""
    path = PATTERNS_DIR / model_name
    if not (path / "full_attention_heads.tsv").is_file():
        available = sorted(p.name for p in PATTERNS_DIR.iterdir() if p.is_dir()) if PATTERNS_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no pattern shipped for {model_name!r} (shipped: {', '.join(available) or 'none'}); "
            "pass a pattern directory (--pattern DIR) or make one with `duoattn identify`"
        )
    return path
