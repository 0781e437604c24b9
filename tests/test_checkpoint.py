"""HF checkpoints: error messages, sharded vs single files, per-rank slices reading only their bytes, the
synthetic writer (atomic, reusable, dry run) and the byte tokenizer."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import helix.checkpoint as ckpt
from helix.checkpoint import (Checkpoint, CheckpointError, check_checkpoint, ensure_checkpoint, make_checkpoint,
                              synthetic_tensors, tensor_shapes, write_safetensors)
from helix.config import ModelConfig
from helix.presets import get_preset
from helix.tokenizer import BOS_ID, EOS_ID, load_tokenizer

TINY = "deepseek-v3-lite-tiny"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


def write_tensors(out, cfg: ModelConfig, tensors) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    write_safetensors(tensors, str(out))
    return str(out)


# --------------------------------------------------------------------------------------------- errors


def test_missing_tensor_is_named_with_its_expected_shape(tmp_path):
    cfg = get_preset(TINY)
    path = write_tensors(tmp_path, cfg, ((n, t) for n, t in synthetic_tensors(cfg) if n != O_PROJ))
    c = Checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        c.check_complete()
    assert O_PROJ in str(err.value) and str(tensor_shapes(cfg)[O_PROJ]) in str(err.value)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    cfg = get_preset(TINY)
    want = tensor_shapes(cfg)[KV_B]
    bad = (want[0], want[1] + 4)
    path = write_tensors(tmp_path, cfg, ((n, torch.zeros(bad) if n == KV_B else t) for n, t in synthetic_tensors(cfg)))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(path).get(KV_B)
    msg = str(err.value)
    assert KV_B in msg and str(bad) in msg and str(want) in msg, msg


def test_directory_without_weights_is_named(tmp_path):
    cfg = get_preset(TINY)
    write_tensors(tmp_path, cfg, iter(()))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        Checkpoint(tmp_path)


def damage(path, how: str) -> None:
    """Truncates a safetensors file to half its size, or overwrites its header with garbage."""
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        with open(path, "r+b") as f:
            f.write(b"\xff" * 64)


@pytest.mark.parametrize("how, reason", [("truncated", "file not fully covered"), ("corrupt", "header too large")])
def test_damaged_file_is_named_when_opened(tiny_checkpoint, tmp_path, how, reason):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    damage(bad / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}/model.safetensors: not a valid safetensors file (")
                       + f".*{reason}.*: truncated or corrupt"):
        Checkpoint(bad)


def test_damaged_or_missing_shard_is_named_before_any_weight_is_read(tmp_path):
    sharded = tmp_path / "sharded"
    make_checkpoint(TINY, sharded, seed=0, dtype="float32", shard_bytes=256 << 10)
    shards = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))
    damage(sharded / shards[-1], "truncated")
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: not a valid safetensors file"):
        check_checkpoint(sharded)
    os.remove(sharded / shards[-1])
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: missing, but listed in model.safetensors.index.json"):
        check_checkpoint(sharded)


def test_slice_outside_the_tensor_is_refused(tiny_checkpoint):
    rows = tensor_shapes(get_preset(TINY))[O_PROJ][0]
    with pytest.raises(CheckpointError, match=r"slice \[0:%d\] along dim 0" % (rows + 1)):
        Checkpoint(tiny_checkpoint).get(O_PROJ, dim=0, start=0, stop=rows + 1)


# --------------------------------------------------------------------------------------------- reading


def test_sharded_and_single_file_checkpoints_read_the_same(tiny_checkpoint, tmp_path):
    sharded = tmp_path / "sharded"
    make_checkpoint(TINY, sharded, seed=0, dtype="float32", shard_bytes=256 << 10)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not (sharded / "model.safetensors").exists()
    a, b = Checkpoint(tiny_checkpoint), Checkpoint(sharded)
    a.check_complete()
    b.check_complete()
    assert a.config == b.config
    for name in tensor_shapes(a.config):
        assert torch.equal(a.get(name), b.get(name)), name


@pytest.mark.parametrize("n", [2, 3, 4])
def test_per_rank_slice_reads_only_its_share(tiny_checkpoint, n):
    c = Checkpoint(tiny_checkpoint)
    full = c.get(O_PROJ)
    full_bytes = c.bytes_read
    cols = full.shape[1] // n  # o_proj is row-parallel over heads: rank r reads columns [r*cols, (r+1)*cols)
    for r in range(n):
        before = c.bytes_read
        part = c.get(O_PROJ, dim=1, start=r * cols, stop=(r + 1) * cols)
        assert torch.equal(part, full[:, r * cols:(r + 1) * cols])
        assert c.bytes_read - before == full_bytes // n
    heads = c.config.num_attention_heads // n  # kv_b_proj rows are per head: [H * (P + V), Lkv]
    rows = heads * (c.config.qk_nope_head_dim + c.config.v_head_dim)
    before = c.bytes_read
    part = c.get(KV_B, dim=0, start=rows, stop=2 * rows, dtype=torch.float64)
    assert part.dtype == torch.float64 and part.shape == (rows, c.config.kv_lora_rank)
    assert c.bytes_read - before == rows * c.config.kv_lora_rank * 4


# --------------------------------------------------------------------------------------------- writing


def test_written_checkpoint_is_complete_and_reads_back_its_config(tiny_checkpoint):
    files = set(os.listdir(tiny_checkpoint))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert ModelConfig.from_json(tiny_checkpoint) == get_preset(TINY)
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (BOS_ID, EOS_ID)
    c = Checkpoint(tiny_checkpoint)
    c.check_complete()
    assert c.get("model.norm.weight").dtype == torch.float32
    # Same seed, same tensor, whether generated alone or as part of the model.
    assert torch.equal(c.get(O_PROJ), dict(synthetic_tensors(c.config, seed=0))[O_PROJ])


def test_dtype_and_seed_reach_the_weights(tmp_path):
    make_checkpoint(TINY, tmp_path / "a", seed=1, dtype="bfloat16")
    make_checkpoint(TINY, tmp_path / "b", seed=2, dtype="bfloat16")
    a, b = Checkpoint(tmp_path / "a").get(O_PROJ), Checkpoint(tmp_path / "b").get(O_PROJ)
    assert a.dtype == torch.bfloat16 and not torch.equal(a, b)


def test_dry_run_on_v3_lite_matches_the_formula_and_writes_nothing(tmp_path):
    cfg = get_preset("deepseek-v3-lite")
    plan = make_checkpoint("deepseek-v3-lite", tmp_path / "v3", dtype="bfloat16", dry_run=True)
    assert plan.parameters == cfg.num_parameters()["total"] == sum(math.prod(s) for s in tensor_shapes(cfg).values())
    assert plan.bytes == 2 * plan.parameters
    assert "27.03 G" in plan.describe() and "54.07 GB" in plan.describe()
    assert not (tmp_path / "v3").exists()


def test_make_checkpoint_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError) as err:
        make_checkpoint(TINY, tmp_path)
    assert repr(str(tmp_path)) in str(err.value) and "not an empty directory" in str(err.value)


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_safetensors", fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_checkpoint(TINY, tmp_path / "default")
    assert os.listdir(tmp_path) == []


def test_ensure_checkpoint_writes_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("HELIX_HOME", str(tmp_path))
    path = ensure_checkpoint(TINY)
    assert path == str(tmp_path / TINY)
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    monkeypatch.setattr(ckpt, "make_checkpoint", lambda *a, **k: pytest.fail("rewrote an existing checkpoint"))
    assert ensure_checkpoint(TINY) == path
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------- tokenizer

TEXTS = ["Hello, world!", "line one\nline two\r\n\ttabbed", "0123456789 + 42 = 43.5e-3",
         "naïve café 東京 😀", " leading and trailing spaces  ", "\x00\x7f control bytes", ""]


def test_byte_tokenizer_round_trips_text(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [BOS_ID] + list(text.encode("utf-8"))
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_auto_tokenizer_loads_offline(tiny_checkpoint):
    # A fresh interpreter with the hub switched off, calling transformers exactly as a user would.
    code = ("import sys, json; from transformers import AutoTokenizer; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); texts = json.loads(sys.argv[2]); "
            "print(all(t.decode(t(s)['input_ids'], skip_special_tokens=True) == s for s in texts))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), json.dumps(TEXTS)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "True"
