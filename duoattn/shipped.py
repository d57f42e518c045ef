"""Patterns shipped inside the package, in ``duoattn/patterns/<model name>/`` (package data of the wheel)."""

from __future__ import annotations

from pathlib import Path

PATTERNS_DIR = Path(__file__).resolve().parent / "patterns"


def shipped_names() -> list[str]:
    """Names of the shipped patterns (each a directory holding ``full_attention_heads.tsv``)."""
    if not PATTERNS_DIR.is_dir():
        return []
    return sorted(p.name for p in PATTERNS_DIR.iterdir() if (p / "full_attention_heads.tsv").is_file())


def shipped_pattern_dir(model_name: str) -> Path:
    """The directory of the pattern shipped for ``model_name``; a clear error if there is none."""
    path = PATTERNS_DIR / model_name
    if not (path / "full_attention_heads.tsv").is_file():
        raise FileNotFoundError(
            f"no pattern shipped for {model_name!r} (shipped: {', '.join(shipped_names()) or 'none'}); "
            "pass a pattern directory (--pattern DIR) or make one with `duoattn identify`"
        )
    return path
