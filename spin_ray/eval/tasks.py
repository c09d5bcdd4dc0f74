"""Seeded synthetic long-context tasks in the manner of RULER (Hsieh et al., 2024), generated on
the fly with the model's own tokenizer and chat template: nothing is downloaded.

Every case is a chat prompt of exactly the asked length in tokens: a haystack (RULER's "noise"
sentences) holding the task's facts, then the question; the model answers greedily, and a case
scores the share of expected strings its answer contains (1 or 0 for single answers).

- `passkey`: one 5-digit pass key at a depth (depths spread evenly over a task's cases);
- `multikey`: four key → 7-digit-number needles, the question asks for one key's (RULER
  NIAH multi-key);
- `multivalue`: four 7-digit numbers for one key at different depths, all asked for (RULER
  NIAH multi-value);
- `vartrack`: a chain of four assignments `VAR A = 12345`, `VAR B = VAR A`, ... spread through
  the haystack; which variables hold the value (RULER variable tracking);
- `aggregation`: a numbered list of words in which three words recur often; which three are
  the most common (RULER common-words extraction, one worked example first).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

TASKS = ("passkey", "multikey", "multivalue", "vartrack", "aggregation")
"""Tasks of `spin-ray eval`, in table order."""

MIN_FILLER_TOKENS = 64
"""Least haystack a prompt holds besides its needles."""
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's haystack sentence, repeated."""
# fmt: off
_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "violin", "castle", "garden", "rocket",
    "pencil", "mirror", "candle", "forest", "harbor", "jacket", "ladder", "magnet", "orange",
    "pepper", "planet", "saddle", "silver", "spider", "summer", "thunder", "tomato", "tunnel",
    "valley", "window", "winter", "yellow", "anchor", "basket", "bridge", "copper", "dragon",
    "engine", "feather", "glacier", "helmet", "island", "jungle", "kettle", "lantern", "meadow",
    "needle", "oyster", "parrot",
)
# fmt: on
"""Words of the multi-key/multi-value needles and of the aggregation list."""


@dataclass(frozen=True)
class TaskCase:
    """One prompt of a task and what its answer must contain."""

    task: str
    """One of `TASKS`."""
    length: int
    """Prompt tokens."""
    prompt_token_ids: tuple[int, ...]
    """The chat-formatted prompt, exactly `length` tokens."""
    context_tokens: int
    """Tokens before the question (the haystack and its facts): computed once, shared by every
    setting; the question is prefilled by each engine."""
    expected: tuple[str, ...]
    """Strings the answer must contain; the score is the share found."""
    max_new_tokens: int
    """Tokens the answer may take."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; use one of {TASKS}")
        if len(self.prompt_token_ids) != self.length:
            raise ValueError(f"length: {self.length} != {len(self.prompt_token_ids)} tokens")
        if not 0 < self.context_tokens < self.length - 1:
            raise ValueError(f"context_tokens: must be in (0, {self.length - 1})")

    def score(self, answer: str) -> float:
        return sum(s in answer for s in self.expected) / len(self.expected)


@dataclass(frozen=True)
class _Facts:
    """A task instance before it is fitted to a length."""

    needles: tuple[tuple[float, str], ...]  # (depth in [0, 1], sentence)
    preamble: str
    question: str
    expected: tuple[str, ...]
    max_new_tokens: int


def make_cases(tokenizer, task: str, length: int, count: int, seed: int) -> list[TaskCase]:
    """`count` cases of `task` with prompts of exactly `length` tokens (seeded: the same
    arguments give the same cases)."""
    if task not in TASKS:
        raise ValueError(f"tasks: unknown task {task!r}; use one of {TASKS}")
    cases = []
    for i in range(count):
        rng = random.Random(f"{seed}-{task}-{length}-{i}")
        facts = _FACTS[task](rng, (i + 0.5) / count)
        cases.append(_fit(tokenizer, task, length, facts))
    return cases


def _passkey(rng: random.Random, depth: float) -> _Facts:
    key = str(rng.randrange(10_000, 100_000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _Facts(
        needles=((depth, needle),),
        preamble="There is an important info hidden inside a lot of irrelevant text. Find it "
        "and memorize it. I will quiz you about the important information there.",
        question="What is the pass key? Answer with the number only.",
        expected=(key,),
        max_new_tokens=12,
    )


def _magic(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _multikey(rng: random.Random, depth: float) -> _Facts:
    keys = rng.sample(_WORDS, 4)
    values = [_magic(rng) for _ in keys]
    asked = rng.randrange(4)
    depths = [(depth + j / 4) % 1.0 for j in range(4)]
    needles = tuple(
        (d, f"One of the special magic numbers for {k} is: {v}.")
        for d, k, v in zip(depths, keys, values)
    )
    return _Facts(
        needles=needles,
        preamble="Some special magic numbers are hidden within the following text. Make sure "
        "to memorize them. I will quiz you about the numbers afterwards.",
        question=f"What is the special magic number for {keys[asked]} mentioned in the text? "
        "Answer with the number only.",
        expected=(values[asked],),
        max_new_tokens=14,
    )


def _multivalue(rng: random.Random, depth: float) -> _Facts:
    key = rng.choice(_WORDS)
    values = [_magic(rng) for _ in range(4)]
    depths = [(depth + j / 4) % 1.0 for j in range(4)]
    needles = tuple(
        (d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(depths, values)
    )
    return _Facts(
        needles=needles,
        preamble="Some special magic numbers are hidden within the following text. Make sure "
        "to memorize them. I will quiz you about the numbers afterwards.",
        question=f"What are all the special magic numbers for {key} mentioned in the text? "
        "List the numbers only.",
        expected=tuple(values),
        max_new_tokens=48,
    )


def _vartrack(rng: random.Random, depth: float) -> _Facts:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[j]} = VAR {names[j - 1]}." for j in range(1, 4)
    ]
    depths = [depth * (j + 1) / 4 for j in range(4)]  # in order, up to the case's depth
    return _Facts(
        needles=tuple(zip(depths, chain)),
        preamble="Memorize and track the chain(s) of variable assignment hidden in the "
        "following text.",
        question=f"Find all variables that are assigned the value {value} in the text above. "
        "List their names only.",
        expected=tuple(names),
        max_new_tokens=32,
    )


def _aggregation(rng: random.Random, depth: float) -> _Facts:
    del depth  # the common words are spread through the whole list
    common = rng.sample(_WORDS, 3)
    example = ["gold", "leaf", "wind"]
    return _Facts(
        needles=(),
        preamble="Below is a numbered list of words. In these words, some appear more often "
        "than others. Example: in a list where 'gold', 'leaf' and 'wind' recur, the answer is: "
        f"{', '.join(example)}.",
        question="What are the 3 most common words in the above list? List the words only.",
        expected=tuple(common),
        max_new_tokens=24,
    )


_FACTS: dict[str, Callable[[random.Random, float], _Facts]] = {
    "passkey": _passkey,
    "multikey": _multikey,
    "multivalue": _multivalue,
    "vartrack": _vartrack,
    "aggregation": _aggregation,
}


def _fit(tokenizer, task: str, length: int, facts: _Facts) -> TaskCase:
    """Grow the haystack until the chat prompt reaches `length` tokens, then trim the last
    filler sentence's tokens so that it is exactly `length`."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head, tail = _chat_parts(tokenizer, facts)
    head_ids, tail_ids = encode(head), encode("\n\n" + facts.question + tail)
    room = length - len(head_ids) - len(tail_ids)
    needles = sum(len(encode(" " + sentence)) for _, sentence in facts.needles)
    if room < needles + MIN_FILLER_TOKENS:
        raise ValueError(f"lengths: {length} tokens is too short for task {task!r}")
    body = _haystack(task, facts, room, encode)[:room]
    ids = head_ids + body + tail_ids
    return TaskCase(
        task=task,
        length=length,
        prompt_token_ids=tuple(ids),
        context_tokens=len(head_ids) + len(body),
        expected=facts.expected,
        max_new_tokens=facts.max_new_tokens,
    )


def _chat_parts(tokenizer, facts: _Facts) -> tuple[str, str]:
    """The chat prompt's text before the haystack (template + preamble) and after the
    question (end of the user turn + the assistant's header)."""
    marker = "\x00HAYSTACK\x00"
    chat = [{"role": "user", "content": f"{facts.preamble}\n\n{marker}"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    head, after = text.split(marker)
    return head, after


def _haystack(task: str, facts: _Facts, room: int, encode) -> list[int]:
    """At least `room` tokens of filler (or of the numbered word list), needles at their
    depths (each needle before the filler sentence at which its depth is passed)."""
    if task == "aggregation":
        return _word_list(facts, room, encode)
    noise = encode(" " + NOISE)
    needles = sorted(facts.needles)
    needle_ids = [encode(" " + sentence) for _, sentence in needles]
    filler_room = max(0, room - sum(map(len, needle_ids)))
    ids: list[int] = []
    placed = 0
    while len(ids) < room + len(noise):
        filled = len(ids) - sum(map(len, needle_ids[:placed]))
        while placed < len(needles) and filled >= needles[placed][0] * filler_room:
            ids += needle_ids[placed]
            placed += 1
        ids += noise
    return ids  # the caller trims it to `room`


def _word_list(facts: _Facts, room: int, encode) -> list[int]:
    """A numbered list: the three common words take 3/8 of the entries (1/8 each), the 46
    others share the rest (each about 1/74)."""
    rng = random.Random(" ".join(facts.expected))
    others = [w for w in _WORDS if w not in facts.expected]
    ids: list[int] = []
    n = 0
    while len(ids) < room:
        n += 1
        word = rng.choice(facts.expected) if rng.random() < 3 / 8 else rng.choice(others)
        ids += encode(f" {n}. {word}")
    return ids
