"""Fixtures of the accuracy-suite tests: the tiny synthetic checkpoint and the local evaluation data."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


@pytest.fixture(scope="session")
def data_dir() -> str:
    """``$HELIX_EVAL_DATA``, else ``../shared/data`` beside the repository; the tests using it skip without it."""
    path = os.environ.get("HELIX_EVAL_DATA") or os.path.join(REPO, "..", "shared", "data")
    if not os.path.isdir(os.path.join(path, "mmlu")) or not os.path.isdir(os.path.join(path, "gsm8k")):
        pytest.skip(f"no evaluation data at {os.path.abspath(path)} (set HELIX_EVAL_DATA to a dir with mmlu/ and gsm8k/)")
    return os.path.abspath(path)
