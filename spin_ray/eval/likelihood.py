"""Teacher-forced log-likelihood of long natural text, sparse against dense.

The text is the English prose of Python's own reference documentation as every CPython
installation ships it (`pydoc_data.topics`, ~1 MB: the help() topics), its topics in sorted
order, so every machine has the same text without a download. A case is its first `length`
tokens: the first `length - scored` are the context (computed once, densely), the last
`scored` are fed as forced decode tokens, so each is predicted with the setting's sparse
attention; the log-probability the model gives each is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "pydoc_data.topics (CPython's help() topics), topics in sorted order"
"""What `natural_text` reads, for reports."""


@dataclass(frozen=True)
class LikelihoodCase:
    """A stretch of natural text whose last `scored` tokens are teacher-forced."""

    length: int
    """Tokens in all."""
    context_token_ids: tuple[int, ...]
    """The first `length - scored` tokens."""
    scored_token_ids: tuple[int, ...]
    """The tokens whose log-probabilities are measured."""

    def __post_init__(self) -> None:
        if len(self.context_token_ids) + len(self.scored_token_ids) != self.length:
            raise ValueError("length: context and scored tokens must add up to it")
        if len(self.context_token_ids) < 3 or not self.scored_token_ids:
            raise ValueError("scored: leave at least 3 context tokens and score at least 1")


def natural_text() -> str:
    """Python's reference documentation topics, joined (see `SOURCE`)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def likelihood_case(tokenizer, length: int, scored: int) -> LikelihoodCase:
    """The first `length` tokens of `natural_text`, the last `scored` of them measured."""
    ids = tokenizer(natural_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"lengths: the text has {len(ids)} tokens, fewer than {length}")
    ids = ids[:length]
    return LikelihoodCase(length, tuple(ids[:-scored]), tuple(ids[-scored:]))
