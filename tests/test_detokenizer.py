"""Incremental detokenizer against `tokenizer.decode`, and its stop conditions."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spin_ray.engine.detokenizer import PROMPT_CONTEXT_TOKENS, Detokenizer, Finish
from spin_ray.sampling_params import SamplingParams

EOS, USER = "<|eos|>", "<|user|>"
CHARS = "abc xyz.,!STOP\n" + "éüñß€日本語テキスト😀🎉"  # 1- to 4-byte UTF-8 characters
CORPUS = ["héllo wörld, naïve café", "€100 für 日本語のテキスト", "emoji 😀🎉 and ñandú"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few multi-byte sentences: besides the 256 byte tokens it has
    merged tokens, some ending or starting inside a UTF-8 character."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS, USER],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`, so every multi-byte character spans tokens."""
    backend = tokenizer.backend_tokenizer
    pieces = backend.pre_tokenizer.pre_tokenize_str(text)
    return [backend.token_to_id(char) for piece, _ in pieces for char in piece]


def reference(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def feed(detok: Detokenizer, ids: list[int]) -> tuple[Finish | None, int, list[str]]:
    """Append ids until the request finishes: (finish, tokens taken, `.text` after each)."""
    texts = []
    for taken, token_id in enumerate(ids, start=1):
        finish = detok.append(token_id)
        texts.append(detok.text)
        if finish is not None:
            return finish, taken, texts
    return None, len(ids), texts


def assert_only_grows(texts: list[str]) -> None:
    for before, after in zip(texts, texts[1:], strict=False):
        assert after.startswith(before), (before, after)


def test_tokenizer_splits_characters(tokenizer):
    """The fixture has merged tokens that decode to U+FFFD alone (part of a character)."""
    partial = [
        i
        for i in range(len(tokenizer))
        if len(tokenizer.convert_ids_to_tokens(i)) > 1 and "\ufffd" in reference(tokenizer, [i])
    ]
    assert len(partial) >= 5


def test_random_ids_decode_like_the_tokenizer(tokenizer):
    """Random ids (invalid UTF-8, split characters, special tokens): the text only ever grows
    and ends equal to decoding all the ids at once."""
    rng = random.Random(0)
    prompt = byte_ids(tokenizer, "prompt: 日本")
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(max_tokens=len(ids), ignore_eos=True)
        finish, taken, texts = feed(Detokenizer(tokenizer, prompt, params), ids)
        assert finish == Finish("length") and taken == len(ids)
        assert_only_grows(texts)
        assert texts[-1] == reference(tokenizer, ids)


@pytest.mark.parametrize("split", ["bytes", "bpe"])
def test_valid_text_never_shows_a_replacement_char(tokenizer, split):
    """Valid UTF-8 text cut into byte tokens or BPE tokens: no step shows U+FFFD, the text
    matches the decoded tokens so far once they end on a character boundary, and the result
    is the original text."""
    rng = random.Random(1)
    for _ in range(50):
        text = "".join(rng.choice(CHARS) for _ in range(rng.randrange(1, 30)))
        ids = byte_ids(tokenizer, text) if split == "bytes" else tokenizer.encode(text)
        detok = Detokenizer(tokenizer, [5, 6], SamplingParams(max_tokens=len(ids)))
        for step, token_id in enumerate(ids, start=1):
            detok.append(token_id)
            assert "\ufffd" not in detok.text
            so_far = reference(tokenizer, ids[:step])
            if not so_far.endswith("\ufffd"):
                assert detok.text == so_far
        assert detok.text == text


class RecordingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call gets; with `fast=False` it
    hides the Rust backend, so the detokenizer falls back to `tokenizer.decode`."""

    def __init__(self, tokenizer, fast: bool):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.window_sizes: list[int] = []
        if fast:
            self.backend_tokenizer = self

    def decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces=False):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
        )


@pytest.mark.parametrize("fast", [True, False])
def test_each_step_decodes_a_short_window(tokenizer, fast):
    """2,000 byte tokens with 4-byte characters: every decode sees at most the already emitted
    tokens of the window (the prompt context at first, else one emission of <= 4 bytes) and a
    held character of <= 4 bytes, however long the output grows."""
    text = "".join(random.Random(2).choice(CHARS) for _ in range(700))
    ids = byte_ids(tokenizer, text)[:2000]
    recording = RecordingTokenizer(tokenizer, fast)
    prompt = list(range(100, 120))
    detok = Detokenizer(recording, prompt, SamplingParams(max_tokens=len(ids)))
    feed(detok, ids)
    assert detok.text == reference(tokenizer, ids)
    assert len(recording.window_sizes) == 2 * len(ids)
    assert max(recording.window_sizes) <= PROMPT_CONTEXT_TOKENS + 4


def test_stop_string_spanning_tokens(tokenizer):
    ids = byte_ids(tokenizer, "The answer is 42. STOP and more")
    for include, expected in [(False, "The answer is 42. "), (True, "The answer is 42. STOP")]:
        params = SamplingParams(max_tokens=100, stop=("STOP",), include_stop_str_in_output=include)
        finish, taken, texts = feed(Detokenizer(tokenizer, [5], params), ids)
        assert finish == Finish("stop", "STOP")
        assert taken == len("The answer is 42. STOP")
        assert texts[-1] == expected
        assert_only_grows(texts)


def test_stop_string_within_bpe_tokens(tokenizer):
    """BPE tokens may carry text past the stop string; it is cut off."""
    text = "naïve café 日本語のテキスト"
    ids = tokenizer.encode(text)
    for stop in ("café", "語の", "キ"):
        params = SamplingParams(max_tokens=100, stop=(stop,))
        finish, _, texts = feed(Detokenizer(tokenizer, [5], params), ids)
        assert finish == Finish("stop", stop)
        assert texts[-1] == text[: text.index(stop)]
        with_stop = SamplingParams(max_tokens=100, stop=(stop,), include_stop_str_in_output=True)
        _, _, texts = feed(Detokenizer(tokenizer, [5], with_stop), ids)
        assert texts[-1] == text[: text.index(stop) + len(stop)]


def test_multibyte_stop_string_and_earliest_match(tokenizer):
    ids = byte_ids(tokenizer, "x😀yz€w")
    params = SamplingParams(max_tokens=100, stop=("z€w", "😀y", "€"))
    finish, taken, texts = feed(Detokenizer(tokenizer, [5], params), ids)
    assert finish == Finish("stop", "😀y") and taken == 6 and texts[-1] == "x"
    params = SamplingParams(max_tokens=100, stop=("€", "z€"))  # both end together: the longer
    finish, _, texts = feed(Detokenizer(tokenizer, [5], params), ids)
    assert finish == Finish("stop", "z€") and texts[-1] == "x😀y"
    # One BPE token brings several matches: the one that ends first wins, not the first listed.
    ids = tokenizer.encode("naïve café 日本語のテキスト")
    assert reference(tokenizer, ids[-1:]) == " 日本語のテキスト"
    params = SamplingParams(max_tokens=100, stop=("キスト", "本語", "café 日", "のテ"))
    finish, taken, texts = feed(Detokenizer(tokenizer, [5], params), ids)
    assert finish == Finish("stop", "café 日") and taken == len(ids) and texts[-1] == "naïve "


def test_text_holds_back_a_possible_stop_prefix(tokenizer):
    """Until the request ends, `.text` leaves out the characters a stop string could still
    claim, so what was shown is never taken back."""
    ids = byte_ids(tokenizer, "abcSTOQ")
    detok = Detokenizer(tokenizer, [5], SamplingParams(max_tokens=7, stop=("STOP",)))
    finish, _, texts = feed(detok, ids)
    assert texts == ["", "", "", "a", "ab", "abc", "abcSTOQ"]
    assert finish == Finish("length")
    assert_only_grows(texts)


def test_stop_string_at_the_very_start(tokenizer):
    params = SamplingParams(max_tokens=10, stop=("ab",))
    finish, taken, texts = feed(Detokenizer(tokenizer, [5], params), byte_ids(tokenizer, "abc"))
    assert finish == Finish("stop", "ab") and taken == 2 and texts[-1] == ""


def test_stop_token_id(tokenizer):
    stop_id = byte_ids(tokenizer, "!")[0]
    ids = byte_ids(tokenizer, "hi 😀!more")
    for include, expected in [(False, "hi 😀"), (True, "hi 😀!")]:
        params = SamplingParams(
            max_tokens=100, stop_token_ids=(stop_id,), include_stop_str_in_output=include
        )
        finish, taken, texts = feed(Detokenizer(tokenizer, [5], params), ids)
        assert finish == Finish("stop", stop_id) and taken == len("hi 😀!".encode())
        assert texts[-1] == expected


def test_eos_and_ignore_eos(tokenizer):
    eos = tokenizer.eos_token_id
    user = tokenizer.convert_tokens_to_ids(USER)
    ids = byte_ids(tokenizer, "ok") + [user, eos] + byte_ids(tokenizer, "go")
    finish, taken, texts = feed(Detokenizer(tokenizer, [5], SamplingParams(max_tokens=9)), ids)
    assert finish == Finish("stop") and taken == 4 and texts[-1] == "ok"
    params = SamplingParams(max_tokens=len(ids), ignore_eos=True)
    finish, taken, texts = feed(Detokenizer(tokenizer, [5], params), ids)
    assert finish == Finish("length") and taken == len(ids) and texts[-1] == "okgo"
    other_eos = byte_ids(tokenizer, "g")[0]  # e.g. a model with several EOS ids
    detok = Detokenizer(tokenizer, [5], SamplingParams(), eos_token_ids=(eos, other_eos))
    finish, taken, texts = feed(detok, byte_ids(tokenizer, "ok") + byte_ids(tokenizer, "go"))
    assert finish == Finish("stop") and taken == 3 and texts[-1] == "ok"


def test_length_limits_and_flush_of_a_split_character(tokenizer):
    """max_tokens and max_model_len end with "length"; a character cut by the limit comes out
    as decode() shows it."""
    ids = byte_ids(tokenizer, "ab€cd")
    finish, taken, texts = feed(Detokenizer(tokenizer, [5], SamplingParams(max_tokens=4)), ids)
    assert finish == Finish("length") and taken == 4
    assert texts[-2] == "ab" and texts[-1] == reference(tokenizer, ids[:4]) == "ab\ufffd"
    detok = Detokenizer(tokenizer, [5, 6, 7], SamplingParams(max_tokens=100), max_model_len=8)
    finish, taken, _ = feed(detok, ids)
    assert finish == Finish("length") and taken == 5
    with pytest.raises(RuntimeError, match="append"):
        detok.append(ids[0])


def test_finish_reason_is_checked():
    with pytest.raises(ValueError, match="reason"):
        Finish("eos")
