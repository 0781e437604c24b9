"""Where a model's weights and tokenizer come from: a Hugging Face checkpoint directory, or ``synthetic:PRESET``.

``synthetic:deepseek-v3-lite`` means the preset's shape with random weights drawn on the device that asks for
them and never written (``SyntheticCheckpoint``): a 54 GB model starts in seconds on GPUs instead of minutes of
writing and reading files. Every process draws the same tensors from (seed 0, tensor name), so a Helix
deployment and the reference see the same weights as long as they draw on the same device type (CUDA
generators agree across GPUs; the CPU stream differs from the CUDA one). Its tokenizer is the byte-level one
that ``helix make-checkpoint`` writes, with the same special-token ids.
"""

from __future__ import annotations

import os
import tempfile

import torch

from helix.checkpoint import Checkpoint, SyntheticCheckpoint
from helix.config import ConfigError, ModelConfig
from helix.presets import CONSTRUCTED, get_preset
from helix.tokenizer import load_tokenizer, with_byte_specials, write_byte_tokenizer

SYNTHETIC = "synthetic:"


def is_synthetic(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(SYNTHETIC)


def synthetic_config(source: str) -> ModelConfig:
    """The preset named after ``synthetic:``, with the byte tokenizer's bos/eos ids."""
    name = source[len(SYNTHETIC):]
    if name in CONSTRUCTED:
        raise ConfigError(f"model={source!r}: {name!r} has constructed weights, not random ones; write them with "
                          f"`helix make-checkpoint --preset {name} --out DIR` and pass DIR")
    try:
        cfg = get_preset(name)
    except ConfigError as e:
        raise ConfigError(f"model={source!r}: {name!r} is not a preset ({e})") from None
    return with_byte_specials(cfg)


def open_source(source: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint | SyntheticCheckpoint:
    """The ``Checkpoint`` interface over ``source``; synthetic weights are drawn on ``device``."""
    if is_synthetic(source):
        return SyntheticCheckpoint(synthetic_config(source), seed=0, device=device)
    return Checkpoint(source)


def source_config(source: str | os.PathLike) -> ModelConfig:
    return synthetic_config(source) if is_synthetic(source) else ModelConfig.from_json(source)


def load_source_tokenizer(source: str | os.PathLike):
    if not is_synthetic(source):
        return load_tokenizer(source)
    with tempfile.TemporaryDirectory(prefix="helix-byte-tokenizer-") as tmp:
        write_byte_tokenizer(tmp, synthetic_config(source).max_position_embeddings)
        return load_tokenizer(tmp)  # fully in memory once loaded
