"""A byte-level tokenizer: token id b < 256 is the byte b, then Llama-3-style special tokens.

Any UTF-8 text round-trips through it, it needs no training data, and it is built with the
`tokenizers` library alone, so it is the same on every machine. spin-tiny ships it, and the
random-weight named shapes borrow it (all its ids are below every supported vocabulary size).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
NUM_SPECIAL_TOKENS = 64
"""Named special tokens plus reserved ones, so the vocabulary is a round 320."""
SPECIAL_TOKENS = [BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT] + [
    f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_TOKENS - 5)
]
VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS
BOS_ID = 256 + SPECIAL_TOKENS.index(BOS)
EOS_IDS = (256 + SPECIAL_TOKENS.index(END_OF_TEXT), 256 + SPECIAL_TOKENS.index(EOT))
"""End of a document and end of a chat turn: both stop generation."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
"""Llama 3's chat layout; the template writes BOS itself, so tokenize its output without
special tokens (as `apply_chat_template(tokenize=True)` does)."""


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer, BOS added on encode, with the chat template attached."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids 256, 257, ... in this order
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, BOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=END_OF_TEXT,
        chat_template=CHAT_TEMPLATE,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenizes to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return chars
