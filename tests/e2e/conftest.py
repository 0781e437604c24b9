"""Fixtures of the accuracy-suite tests: the tiny synthetic checkpoint (as a str path) and its reference backend."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The embedded default checkpoint (same preset, seed and dtype as ``ensure_checkpoint``), in a tmp dir."""
    from helix.checkpoint import DEFAULT_PRESET, make_checkpoint

    path = str(tmp_path_factory.mktemp("ckpt") / DEFAULT_PRESET)
    make_checkpoint(DEFAULT_PRESET, path)
    return path


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> str:
    """The synthetic checkpoints' byte tokenizer alone (1 token per byte after BOS): what the needle generators
    count with, without writing weights."""
    from helix.tokenizer import write_byte_tokenizer

    path = str(tmp_path_factory.mktemp("byte-tokenizer"))
    write_byte_tokenizer(path, 1 << 20)
    return path


@pytest.fixture(scope="session")
def reference_backend(tiny_checkpoint):
    from evals.backends import ReferenceBackend

    return ReferenceBackend(tiny_checkpoint)
