"""The eval's cases: exact lengths, facts in the prompt where they should be, seeded, scored as
the share of expected strings; the log-likelihood text is the same on every machine."""

from __future__ import annotations

import pytest

from spin_ray.eval.likelihood import likelihood_case, natural_text
from spin_ray.eval.tasks import TASKS, make_cases
from spin_ray.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("spin-tiny")  # byte-level: one token per byte


@pytest.mark.parametrize("task", TASKS)
def test_cases_have_the_length_and_hold_their_facts(tokenizer, task):
    cases = make_cases(tokenizer, task, 1500, 3, seed=1)
    assert cases == make_cases(tokenizer, task, 1500, 3, seed=1)
    assert cases != make_cases(tokenizer, task, 1500, 3, seed=2)
    for case in cases:
        assert len(case.prompt_token_ids) == case.length == 1500
        context = tokenizer.decode(case.prompt_token_ids[: case.context_tokens])
        question = tokenizer.decode(case.prompt_token_ids[case.context_tokens :])
        assert question.lstrip().startswith(("What", "Find"))
        for expected in case.expected:
            assert expected in context
        assert case.score(" ".join(case.expected)) == 1.0
        assert case.score("nothing") == 0.0


def test_passkey_depths_spread_over_the_cases(tokenizer):
    cases = make_cases(tokenizer, "passkey", 2000, 4, seed=0)
    depths = []
    for case in cases:
        text = tokenizer.decode(case.prompt_token_ids[: case.context_tokens])
        depths.append(text.index(case.expected[0]) / len(text))
    assert depths == sorted(depths) and depths[0] < 0.25 and depths[-1] > 0.75


def test_a_length_too_short_for_the_task_is_refused(tokenizer):
    with pytest.raises(ValueError, match="lengths: 100 tokens is too short"):
        make_cases(tokenizer, "multivalue", 100, 1, seed=0)


def test_likelihood_text_is_pythons_own_documentation(tokenizer):
    text = natural_text()
    assert len(text) > 100_000 and "Assert statements are a convenient way" in text
    case = likelihood_case(tokenizer, 4096, 64)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:4096]
    assert list(case.context_token_ids + case.scored_token_ids) == ids
    assert len(case.scored_token_ids) == 64
