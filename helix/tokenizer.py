"""Tokenizers: loading a checkpoint's tokenizer, and the byte-level one written into synthetic checkpoints.

The byte tokenizer maps every UTF-8 byte to its own id (0..255), so any text round-trips exactly, and
appends three specials: ``<|bos|>`` 256, ``<|eos|>`` 257, ``<|pad|>`` 258 (the tiny preset's
bos_token_id / eos_token_id). A model's vocabulary may be larger than the tokenizer's 259 ids; the
extra rows are simply never produced by encoding.

It is stored as the ``tokenizers`` library's ``tokenizer.json`` (GPT-2 style ByteLevel byte-to-character
map, a BPE model with no merges) plus ``tokenizer_config.json``, which
``transformers.AutoTokenizer.from_pretrained(dir)`` loads with no network access.

``tokenizer_config.json`` also carries a chat template (``CHAT_TEMPLATE``) shaped like DeepSeek's chat models':
BOS, the system prompt, then "User: ..." and "Assistant: ..." turns, each assistant turn closed by EOS, and
"Assistant:" to open the reply. It is what lm-eval's ``--apply_chat_template`` renders with (evals/README.md).
"""

from __future__ import annotations

import dataclasses
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet ByteLevel pre-tokenization uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


def byte_tokenizer() -> Tokenizer:
    """Id i < 256 is byte i; encoding prepends ``<|bos|>`` like DeepSeek's tokenizers do."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: the whole text is one "word" of byte characters, so no byte is ever dropped.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)])
    assert (tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD)) == (BOS_ID, EOS_ID, PAD_ID)
    return tok


def with_byte_specials(cfg):
    """``cfg`` (a ModelConfig) with bos/eos set to this tokenizer's ids: a synthetic model ships the byte
    tokenizer, whatever ids its preset's real tokenizer uses (V3's 0/1 are bytes 0x00/0x01 here)."""
    return dataclasses.replace(cfg, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def write_byte_tokenizer(out: str | os.PathLike, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into the checkpoint directory ``out``."""
    out = os.fspath(out)
    byte_tokenizer().save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def load_tokenizer(path: str | os.PathLike):
    """The Hugging Face tokenizer of a checkpoint directory, loaded from local files only."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is actually needed

    return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
