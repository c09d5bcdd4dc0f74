"""Incremental detokenization and stop checks for one request.

Each new token is decoded within a short window: the tokens since the last emission plus the
one emission before them (as vLLM does; the earlier token gives SentencePiece tokenizers the
context they need for a leading space). The window's text minus the text of its already
emitted part is the new text, so a step costs O(1) decoding, not O(length). While the window's
text ends in U+FFFD the tokens may end inside a multi-byte UTF-8 character (byte-level
tokenizers split them), so nothing is emitted until a later token completes it; when the
request finishes, whatever is held is emitted as is. The result equals
`tokenizer.decode(output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`
(special tokens are always skipped; the token that ended the request by EOS or a stop token id
is left out of the text unless `include_stop_str_in_output`).

Stop strings are searched only in the tail that can hold a new match: the new characters and
the `len(stop) - 1` before them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from spin_ray.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded ahead of the first output tokens, for context (as vLLM)."""


@dataclass(frozen=True)
class Finish:
    """Why a request stopped generating."""

    reason: str
    """"stop" (EOS, a stop token id or a stop string) or "length" (max_tokens or
    max_model_len)."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that matched; None for EOS and "length"."""

    def __post_init__(self) -> None:
        if self.reason not in ("stop", "length"):
            raise ValueError(f"reason: must be 'stop' or 'length', got {self.reason!r}")


def _decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """ids → text without special tokens or clean-up; a fast tokenizer's Rust decoder directly
    (the same text, several times cheaper than `tokenizer.decode`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tokenizer.decode(
        list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


class Detokenizer:
    """Text and stop conditions of one request's output, fed one token at a time."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Iterable[int] | None = None,
        max_model_len: int | None = None,
    ):
        """`eos_token_ids` defaults to the tokenizer's EOS; `max_model_len` (prompt + output
        tokens) ends the request with "length" when given."""
        self.params = params
        self.eos_token_ids = frozenset(
            (tokenizer.eos_token_id,) if eos_token_ids is None else eos_token_ids
        ) - {None}
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.max_model_len = max_model_len
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_output_tokens = 0
        self.finish: Finish | None = None
        """Set once the request has finished."""
        self._decode = _decoder(tokenizer)
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])  # context + output tokens
        self._prefix_offset = 0  # the decode window starts here
        self._read_offset = len(self._ids)  # tokens before this one are in the text
        self._text = ""  # output text so far, cut at a matched stop string
        # A later stop-string match may start this many characters back into the text.
        longest_stop = max((len(s) for s in params.stop), default=0)
        self._unstable_chars = 0 if params.include_stop_str_in_output else max(longest_stop - 1, 0)

    @property
    def text(self) -> str:
        """The output text that no later stop-string match can take back: all of it once the
        request has finished, else all but the last (longest stop string - 1) characters. It
        only ever grows."""
        if self.finish is not None or not self._unstable_chars:
            return self._text
        return self._text[: max(len(self._text) - self._unstable_chars, 0)]

    def append(self, token_id: int) -> Finish | None:
        """Take the next output token; return why the request finishes with it, else None."""
        if self.finish is not None:
            raise RuntimeError(f"append: the request already finished ({self.finish})")
        self.num_output_tokens += 1
        finish = self._token_finish(token_id)
        ended_by_token = finish is not None and finish.reason == "stop"
        if not ended_by_token or self.params.include_stop_str_in_output:
            self._ids.append(token_id)
        new_text = self._decode_new_text(flush=finish is not None)
        self._text += new_text
        stop_string = self._match_stop_string(len(new_text))
        if stop_string is not None:
            finish = Finish("stop", stop_string)
        self.finish = finish
        return finish

    def _token_finish(self, token_id: int) -> Finish | None:
        """EOS, a stop token id, max_tokens or max_model_len."""
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
            return Finish("stop")
        if token_id in self.stop_token_ids:
            return Finish("stop", token_id)
        if self.num_output_tokens >= self.params.max_tokens:
            return Finish("length")
        num_tokens = self.num_prompt_tokens + self.num_output_tokens
        if self.max_model_len is not None and num_tokens >= self.max_model_len:
            return Finish("length")
        return None

    def _decode_new_text(self, flush: bool) -> str:
        """The text the tokens since `_read_offset` add; "" while it may end inside a UTF-8
        character (unless `flush`)."""
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if not flush and (len(window) <= len(emitted) or window.endswith("\ufffd")):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window[len(emitted) :]

    def _match_stop_string(self, num_new_chars: int) -> str | None:
        """Find the stop string that ends first in the new characters; cut the text there."""
        if not num_new_chars or not self.params.stop:
            return None
        text = self._text
        first = None  # (end, start, stop string) of the earliest-ending match
        for stop in self.params.stop:
            start = text.find(stop, max(len(text) - num_new_chars - len(stop) + 1, 0))
            if start != -1 and (first is None or (start + len(stop), start) < first[:2]):
                first = (start + len(stop), start, stop)
        if first is None:
            return None
        end, start, stop = first
        self._text = text[: end if self.params.include_stop_str_in_output else start]
        return stop
