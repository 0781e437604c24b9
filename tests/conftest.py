"""Shared fixtures.

Synthetic checkpoints are written once per pytest session, i.e. once per xdist worker, into pytest's tmp
directory (never into the repository or ``$HELIX_HOME``). Ask for ``tiny_checkpoint`` for the
deepseek-v3-lite-tiny preset, or call ``checkpoint_factory(preset, seed=..., dtype=..., **config_overrides)``
for a variant; equal arguments return the same directory. ``truncated_checkpoint`` and ``nan_checkpoint`` are
damaged copies of the tiny one, for the bad-input tests. ``data_dir`` is the local MMLU / GSM8K data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helix.checkpoint import DEFAULT_PRESET, make_checkpoint
from helix.presets import get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    written: dict[str, Path] = {}

    def make(preset: str = DEFAULT_PRESET, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
        key = json.dumps([preset, seed, dtype, overrides], sort_keys=True)
        if key not in written:
            out = tmp_path_factory.mktemp("ckpt") / preset
            # By name when unchanged, so a constructed preset (deepseek-v3-needle) gets its constructed weights.
            make_checkpoint(get_preset(preset, **overrides) if overrides else preset, out, seed=seed, dtype=dtype)
            written[key] = out
        return written[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    """The deepseek-v3-lite-tiny synthetic checkpoint: float32 weights, seed 0, tokenizer files included."""
    return checkpoint_factory()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """The tiny checkpoint's single-device oracle in float64: what every deployment's tokens and scores must equal."""
    import torch

    from helix.reference import ReferenceModel

    return ReferenceModel.from_checkpoint(tiny_checkpoint, dtype=torch.float64)


@pytest.fixture(scope="session")
def needle_checkpoint(checkpoint_factory) -> Path:
    """The deepseek-v3-needle checkpoint (constructed weights, helix/needle.py) in float32."""
    return checkpoint_factory("deepseek-v3-needle")


@pytest.fixture(scope="session")
def truncated_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with its model.safetensors cut to half its size (an interrupted download)."""
    bad = tmp_path_factory.mktemp("truncated") / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    weights = bad / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return bad


@pytest.fixture(scope="session")
def nan_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with one NaN in a layer's o_proj: every logit of every step is NaN."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path_factory.mktemp("nan") / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


@pytest.fixture(scope="session")
def rank_pool():
    """Four local gloo ranks, spawned once per xdist worker; ``pool.run(fn, ..., n=N)`` uses ranks 0..N-1."""
    from helix.workers import RankPool

    with RankPool(4) as pool:
        yield pool


def pytest_collection_modifyitems(config, items):
    """Capability probe: `gpu` tests need one CUDA device, `multi_gpu(n)` tests need n on this host."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("multi_gpu")
        need = marker.args[0] if marker else (1 if item.get_closest_marker("gpu") else 0)
        if need > found:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s); torch sees {found}"))


@pytest.fixture(scope="session")
def data_dir() -> str:
    """``$HELIX_EVAL_DATA``, else ``../shared/data`` beside the repository; the tests using it skip without it."""
    path = os.environ.get("HELIX_EVAL_DATA") or os.path.join(REPO, "..", "shared", "data")
    if not os.path.isdir(os.path.join(path, "mmlu")) or not os.path.isdir(os.path.join(path, "gsm8k")):
        pytest.skip(f"no evaluation data at {os.path.abspath(path)} (set HELIX_EVAL_DATA to a dir with mmlu/ and gsm8k/)")
    return os.path.abspath(path)
