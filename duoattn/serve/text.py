"""Token ids to text while streaming: incremental detokenisation and stop sequences."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a cut multi-byte character to


class TextStream:
    """The text of a growing list of generated token ids, handed out in safe pieces.

    Decoding a window of the last tokens (with the one before it as context) instead of all of them keeps each step
    cheap; the pieces join to ``tokenizer.decode(ids, skip_special_tokens=True)``. A piece is held back while it ends
    in a cut character or could be the start of a stop sequence; when a stop sequence appears, the text ends before
    it (OpenAI's behaviour) and :attr:`stopped` is set.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = list(stops or [])
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of text already handed out
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] were decoded last time: the context of the next window
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that is now safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(before) and not window.endswith(INCOMPLETE):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation (held-back pieces included)."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        self.text += window[len(before) :]
        self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # A stop sequence may straddle what was sent and the new text: search from just before the new part.
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        if self.stopped:
            self.text = self.text[:end]
        return piece

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best
