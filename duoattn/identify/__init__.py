"""Retrieval-head identification: optimise one gate per (layer, KV head) so that the model's output stays the same
while as many heads as possible use streaming attention (DuoAttention, Xiao et al., arXiv 2410.10819)."""

from .run import IdentifyResult, identify
from .train import IdentifyConfig

__all__ = ["IdentifyConfig", "IdentifyResult", "identify"]
