"""Text out, one token at a time: incremental detokenization and stop strings.

Decoding every token on its own breaks multi-byte characters and the spaces that SentencePiece / byte-level
BPE tokenizers attach to the next token, and decoding the whole output every step is quadratic. As HF's
`TextStreamer` and vLLM do, a window of tokens is decoded: `prefix_offset` marks where the window starts (a
few tokens of context, so leading spaces come out right) and `read_offset` where the text already shown ends;
the new text is decode(window)[len(decode(window up to read_offset)):], held back while it ends in an
incomplete character (U+FFFD).

Stop strings (OpenAI's `stop`) may span tokens and several may be given: the output text is searched after
every token, from a little before the new text (the longest stop string − 1 characters), so a stop string
that starts in an earlier token is found; the text is cut before it (the stop string is not part of the
output) and the request finishes with reason "stop" at that token. Text that could still become the start
of a stop string is held back, so a client never receives a partial stop string; it is released once it
cannot be one, or when the request ends for another reason.
"""

from __future__ import annotations

from typing import Sequence

from dspark.errors import RequestError

MAX_STOP_STRINGS = 16  # OpenAI allows up to 4; vLLM any number — a bound keeps per-token work small


def check_stop_strings(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    """OpenAI's `stop`: None, one string or a list of non-empty strings → a tuple. RequestError otherwise."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise RequestError(f"stop must be a string or a list of strings, got {stop!r}")
    if len(items) > MAX_STOP_STRINGS:
        raise RequestError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    if any(s == "" for s in items):
        raise RequestError("stop: stop strings must not be empty")
    return tuple(dict.fromkeys(items))


class IncrementalDetokenizer:
    """Per request: feed token ids one by one (`add`), read the text that may be shown (`take_new_text`).

    tokenizer: an HF tokenizer (`decode(ids, skip_special_tokens=True)`); prompt_ids: the prompt (its last
    tokens are the first window's context); stop: stop strings (`check_stop_strings`)."""

    CONTEXT_TOKENS = 5  # tokens of context kept before the unread text (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._ids: list[int] = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # the output text so far (cut before a stop string once one is found)
        self._sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Append one output token; True when it completes a stop string (then `text` ends before it)."""
        if self.stopped:
            raise RuntimeError("add() after a stop string was found")
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset: self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # nothing new yet, or an incomplete character
        new_text = full[len(prefix):]
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += new_text
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self.stop:
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.stopped = True
        return self.stopped

    def _held_back(self) -> int:
        """Characters at the end of `text` that may be the start of a stop string."""
        for length in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0

    def take_new_text(self, final: bool = False) -> str:
        """Text not handed out yet that can no longer turn out to be part of a stop string (all of it when
        `final` or after a stop string; `final` also releases an incomplete character, as U+FFFD)."""
        if final and not self.stopped and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset: self._read_offset])
            self.text += self._decode(self._ids[self._prefix_offset:])[len(prefix):]
            self._prefix_offset = self._read_offset = len(self._ids)
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        out = self.text[self._sent: end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out
