"""``duoattn serve``: an OpenAI-compatible HTTP server over the DuoAttention deployment path.

FastAPI + uvicorn serve the OpenAI completions / chat-completions API (:mod:`.app`, :mod:`.schema`); one worker
thread owns the model and interleaves the running requests between decode steps (:mod:`.scheduler`), each on its
own split cache whose memory is reserved from a pool sized at start-up (:mod:`.pool`). See ``docs/serving.md``.
"""

from .config import ServeConfig
from .engine import Engine

__all__ = ["Engine", "ServeConfig"]
