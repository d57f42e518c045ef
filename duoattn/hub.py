"""Patterns by name: shipped with the package, published with the original implementation, or on the Hugging Face Hub.

:func:`resolve_pattern_dir` turns what a user types into a local pattern directory, in this order:

1. an existing local directory (the upstream format: ``full_attention_heads.tsv`` + ``config.json``);
2. the name of a pattern shipped inside the package (``duoattn/patterns/<name>/``);
3. the name of a pattern published in the original repository (``mit-han-lab/duo-attention``, ``attn_patterns/``),
   or the Hugging Face id of the model it was made for; its two files are fetched over plain HTTPS the first time
   and kept in the Hugging Face assets cache (``HF_ASSETS_CACHE``, default ``~/.cache/huggingface/assets``);
4. a Hugging Face Hub repository id ``owner/name`` holding the two files at its root, through
   ``huggingface_hub.snapshot_download`` (cached in ``HF_HUB_CACHE``, honours ``HF_HUB_OFFLINE`` and ``revision``).

:func:`write_model_card` and :func:`push_pattern` write the same format plus a README.md model card.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import constants

from .io import atomic_write_bytes, atomic_write_text
from .models import EMBEDDED_NAME
from .pattern import CONFIG_FILE, GATES_FILE
from .shipped import PATTERNS_DIR, shipped_names

if TYPE_CHECKING:
    from .pattern import HeadPattern

MODEL_CARD = "README.md"
UPSTREAM_REPO = "mit-han-lab/duo-attention"
# Raw files of the original repository; {revision} is a commit (or branch), {path} the pattern's directory.
UPSTREAM_URL = "https://raw.githubusercontent.com/mit-han-lab/duo-attention/{revision}/attn_patterns/{path}/{file}"
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class UpstreamPattern:
    """A pattern published with the original implementation.

    Attributes:
        name: the documented name, e.g. ``Llama-3.1-8B-Instruct``.
        model: the Hugging Face id of the model it was trained for (accepted as a name too).
        path: its directory under ``attn_patterns/`` in the original repository.
        revision: a commit of the original repository holding it; pinned, so the cached copy never goes stale.
    """

    name: str
    model: str
    path: str
    revision: str


_CTX_32K = "lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10"
_REV_2024 = "03dca842639c64ed0d0daf9042da845cdea44637"
UPSTREAM_PATTERNS: tuple[UpstreamPattern, ...] = (
    UpstreamPattern("Llama-2-7B-32K-Instruct", "togethercomputer/Llama-2-7B-32K-Instruct",
                    f"Llama-2-7B-32K-Instruct/{_CTX_32K}", _REV_2024),
    UpstreamPattern("Llama-3-8B-Instruct-Gradient-1048k", "gradientai/Llama-3-8B-Instruct-Gradient-1048k",
                    f"Llama-3-8B-Instruct-Gradient-1048k/{_CTX_32K}", _REV_2024),
    UpstreamPattern("Llama-3-8B-Instruct-Gradient-4194k", "gradientai/Llama-3-8B-Instruct-Gradient-4194k",
                    f"Llama-3-8B-Instruct-Gradient-4194k/{_CTX_32K}", _REV_2024),
    UpstreamPattern("Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                    "Meta-Llama-3.1-8B-Instruct/lr=0.02-reg=0.05-ctx=1000_128000-multi_passkey10",
                    "53b606ce291c1036f9f940eac47849d7878f589a"),
    UpstreamPattern("Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2",
                    f"Mistral-7B-Instruct-v0.2/{_CTX_32K}", _REV_2024),
    UpstreamPattern("Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3",
                    f"Mistral-7B-Instruct-v0.3/{_CTX_32K}", _REV_2024),
)


def known_names() -> list[str]:
    """Every name :func:`resolve_pattern_dir` knows without a path or a Hub id: shipped, then upstream."""
    return shipped_names() + [p.name for p in UPSTREAM_PATTERNS]


def upstream_pattern(name: str) -> UpstreamPattern | None:
    """The published pattern called ``name``, or made for the model ``name`` (its Hugging Face id); else None."""
    for pattern in UPSTREAM_PATTERNS:
        if name in (pattern.name, pattern.model):
            return pattern
    return None


def is_pattern_dir(path: Path) -> bool:
    return (path / GATES_FILE).is_file() and (path / CONFIG_FILE).is_file()


# ------------------------------------------------------------------------------------------------- resolve
def resolve_pattern_dir(
    name_or_path: str | os.PathLike[str], revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A local directory holding the pattern ``name_or_path`` (see the module docstring for the lookup order).

    Args:
        name_or_path: a directory, a shipped or published name, or a Hub repo id ``owner/name``.
        revision: for a published name, a commit or branch of the original repository (default: the pinned
            commit); for a Hub repo, a branch, tag or commit (default ``main``). Refused for a directory or a
            shipped name, which have no revisions.
        cache_dir: where downloads are kept (default: the Hugging Face assets cache for published patterns,
            ``HF_HUB_CACHE`` for Hub repos).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a pattern is named by a string or a path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        raise NotADirectoryError(f"pattern directory {text!r} is a file, not a directory")
    if path.is_dir():
        _no_revision(revision, f"the local directory {text!r}")
        if not is_pattern_dir(path):
            raise FileNotFoundError(f"pattern directory {text!r} lacks {GATES_FILE} or {CONFIG_FILE}")
        return path
    if text in shipped_names():
        _no_revision(revision, f"the shipped pattern {text!r}")
        return PATTERNS_DIR / text
    upstream = upstream_pattern(text)
    if upstream is not None:
        return fetch_upstream(upstream, revision=revision, cache_dir=cache_dir)
    if _looks_like_repo_id(text):
        return _hub_snapshot(text, revision, cache_dir)
    raise FileNotFoundError(
        f"pattern {text!r} is not a directory, a known name ({', '.join(known_names())}) or a Hugging Face Hub "
        "repo id (owner/name)"
    )


def _no_revision(revision: str | None, what: str) -> None:
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to published and Hub patterns, not to {what}")


def _looks_like_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:  # a bare name is an unknown name here, not a legacy Hub id
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[GATES_FILE, CONFIG_FILE, MODEL_CARD]
            )
        )
    except Exception as err:  # huggingface_hub raises many kinds (offline, not found, gated, HTTP)
        raise FileNotFoundError(
            f"pattern {repo_id!r} is not a local directory or a known name ({', '.join(known_names())}), and as a "
            f"Hugging Face Hub repo it could not be read: {type(err).__name__}: {err}"
        ) from err
    if not is_pattern_dir(folder):
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} (revision {revision or 'main'}) has no {GATES_FILE} and {CONFIG_FILE} at its root"
        )
    return folder


# ----------------------------------------------------------------------------------------- published patterns
def upstream_cache_dir(pattern: UpstreamPattern, revision: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where a published pattern is kept: ``<assets>/duoattn/upstream/<revision>/<path>``."""
    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_ASSETS_CACHE) / "duoattn" / "upstream"
    return root.expanduser() / revision / pattern.path


def fetch_upstream(
    pattern: UpstreamPattern, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The local copy of a published pattern, downloaded the first time it is asked for.

    Each file is written to a temporary name and renamed; the gates file is written last, so a directory with
    both files is complete. ``HF_HUB_OFFLINE=1`` refuses to download.
    """
    revision = revision or pattern.revision
    target = upstream_cache_dir(pattern, revision, cache_dir)
    if is_pattern_dir(target):
        return target
    if constants.is_offline_mode():
        raise FileNotFoundError(
            f"pattern {pattern.name!r} is not cached in {target} and HF_HUB_OFFLINE is set: run once online, or copy "
            f"its {CONFIG_FILE} and {GATES_FILE} from {UPSTREAM_REPO}/attn_patterns/{pattern.path} there"
        )
    files = {}
    for name in (CONFIG_FILE, GATES_FILE):
        url = UPSTREAM_URL.format(revision=revision, path=pattern.path, file=name)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                files[name] = response.read()
        except (urllib.error.URLError, OSError) as err:
            raise FileNotFoundError(f"could not download pattern {pattern.name!r} from {url}: {err}") from err
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, GATES_FILE):
        atomic_write_bytes(target / name, files[name])
    return target


# ------------------------------------------------------------------------------------------- writing / Hub
BUDGET_SPARSITIES = (0.25, 0.5, 0.75, 0.9)
BUDGET_CONTEXTS = (8192, 32768, 131072)


def _model_name(pattern: HeadPattern, model: str | None) -> str | None:
    # duoattn identify stores "model"; the original stores "model_name" (a local path such as models/<name>).
    return model or pattern.metadata.get("model") or pattern.metadata.get("model_name")


def kv_fraction(pattern: HeadPattern, sparsity: float, tokens: int) -> float:
    """KV-cache bytes under DuoAttention over those of full attention, for ``tokens`` tokens of context."""
    roles = pattern.binarize(sparsity=sparsity)
    retrieval = int(roles.sum())
    streaming = roles.size - retrieval
    return (retrieval * tokens + streaming * min(tokens, pattern.sink + pattern.recent)) / (roles.size * tokens)


# duoattn identify's flags, by the config.json key that records each one's value (see duoattn/identify/run.py).
_IDENTIFY_FLAGS = (
    ("steps", "--steps"), ("min_len", "--min-len"), ("max_len", "--max-len"), ("num_passkeys", "--num-passkeys"),
    ("passkey_words", "--passkey-words"), ("lr", "--lr"), ("reg", "--reg"), ("sink_size", "--sink"),
    ("recent_size", "--recent"), ("device", "--device"), ("dtype", "--dtype"), ("seed", "--seed"),
    ("save_every", "--save-every"), ("full_term", "--full-term"), ("loss_positions", "--loss-positions"),
    ("init", "--init"), ("hard_steps", "--hard-steps"), ("hard_budgets", "--hard-budgets"), ("hard_lr", "--hard-lr"),
    ("pin_budget", "--pin-budget"),
)
_HARD_STEP_KEYS = ("hard_steps", "hard_budgets", "hard_lr", "pin_budget")  # meaningless without hard steps


def identify_command(pattern: HeadPattern) -> str | None:
    """The ``duoattn identify`` command equivalent to the settings a pattern records; None if it records none."""
    recorded = {**pattern.metadata, "sink_size": pattern.sink, "recent_size": pattern.recent}
    if not all(key in recorded for key in ("steps", "reg", "num_passkeys")):  # not made by duoattn identify
        return None
    parts = ["duoattn", "identify"]
    model = recorded.get("model")
    if model and model != EMBEDDED_NAME:
        parts += ["--model", str(model)]
    if not recorded.get("hard_steps"):  # the hard-step settings do nothing without hard steps
        recorded = {k: v for k, v in recorded.items() if k not in _HARD_STEP_KEYS}
    for key, flag in _IDENTIFY_FLAGS:
        value = recorded.get(key)
        if value is not None:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if recorded.get("haystack"):
        parts += ["--haystack", *map(str, recorded["haystack"])]
    return shlex.join(parts + ["--out", "DIR"])


def _load_line(name: str | None) -> str:
    if name == EMBEDDED_NAME:
        return "model, tokenizer = load_model()   # the embedded SmolLM2-135M-Instruct"
    return f"model, tokenizer = load_model({name!r})" if name else "model, tokenizer = load_model(MODEL)"


def model_card(pattern: HeadPattern, model: str | None = None, command: str | None = None,
               repo_id: str | None = None) -> str:
    """The README.md of a pattern: the model, how to use it, memory per budget and the command that made it."""
    name = _model_name(pattern, model)
    command = command or pattern.metadata.get("command")
    rebuilt = None if command else identify_command(pattern)
    heads = pattern.num_layers * pattern.num_kv_heads
    at_threshold = 1.0 - float(pattern.binarize().mean())
    header = ["---", "library_name: duoattn", "tags:", "- duoattention", "- kv-cache", "- long-context"]
    if name and "/" in name and not name.startswith(("/", ".", "models/")):
        header.append(f"base_model: {name}")
    header.append("---")
    source = repo_id or "PATH_OR_REPO_ID"
    lines = [
        *header,
        "",
        f"# DuoAttention head pattern for {name or 'an unnamed model'}",
        "",
        f"Gates of {pattern.num_layers} layers x {pattern.num_kv_heads} KV heads in the format of the original "
        f"DuoAttention implementation ({GATES_FILE} + {CONFIG_FILE}); streaming heads keep the first "
        f"{pattern.sink} and the last {pattern.recent} tokens.",
        "",
        "```python",
        "from duoattn import HeadPattern, duo_attention, load_model",
        "",
        _load_line(name),
        f"pattern = HeadPattern.from_pretrained({source!r})",
        "with duo_attention(model, pattern, sparsity=0.5):   # half the KV heads streaming",
        "    ...",
        "```",
        "",
        "## Budgets",
        "",
        "`sparsity` is the fraction of KV heads made streaming (lowest gates first). KV-cache memory against full "
        "attention:",
        "",
        "| sparsity | retrieval heads | " + " | ".join(f"KV at {n // 1024}K tokens" for n in BUDGET_CONTEXTS) + " |",
        "|---|---|" + "---|" * len(BUDGET_CONTEXTS),
    ]
    for s in BUDGET_SPARSITIES:
        retrieval = int(pattern.binarize(sparsity=s).sum())
        cells = " | ".join(f"{kv_fraction(pattern, s, n):.0%}" for n in BUDGET_CONTEXTS)
        lines.append(f"| {s:g} | {retrieval} of {heads} | {cells} |")
    lines += [
        "",
        "The original implementation deploys GQA models at sparsity 0.5 and MHA models at 0.75; the gates' own "
        f"threshold 0.5 makes {at_threshold:.0%} of the heads streaming. Check a budget on your task with "
        "`duoattn eval niah --sparsity 0,0.25,0.5,0.75,0.9 --pattern ...`.",
        "",
        "## How it was made",
        "",
    ]
    if command:
        lines += ["```bash", command, "```"]
    elif rebuilt:
        lines += [f"The settings recorded in {CONFIG_FILE}, as a command:", "", "```bash", rebuilt, "```"]
    else:
        lines.append("The command was not recorded.")
    settings = {k: pattern.metadata[k] for k in ("steps", "num_steps", "lr", "reg", "reg_weight", "min_len",
                                                "max_len", "context_length_min", "context_length_max")
                if k in pattern.metadata}
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + f" (all in {CONFIG_FILE})."]
    return "\n".join(lines) + "\n"


def write_model_card(pattern: HeadPattern, directory: str | os.PathLike[str], model: str | None = None,
                     command: str | None = None, repo_id: str | None = None) -> Path:
    path = Path(directory) / MODEL_CARD
    atomic_write_text(path, model_card(pattern, model, command, repo_id))
    return path


def push_pattern(pattern: HeadPattern, repo_id: str, model: str | None = None, command: str | None = None,
                 private: bool | None = None, token: str | None = None, revision: str | None = None,
                 commit_message: str = "Upload DuoAttention head pattern") -> Any:
    """Create (if needed) the Hub model repo ``repo_id`` and upload the pattern with its model card."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    tmp = Path(tempfile.mkdtemp(prefix="duoattn-pattern-"))
    try:
        pattern.save(tmp)
        write_model_card(pattern, tmp, model, command, repo_id)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
