"""The deployment file of disaggregated serving, parsed and validated into a ``RunSpec`` (helix/spec.py) before
any process starts.

YAML or JSON, three sections (docs/design.md §4.3)::

    model:
      path: /checkpoints/deepseek-v3-lite     # an HF checkpoint directory (config.json + safetensors),
                                              # or synthetic:PRESET (random weights, helix/sources.py)
      dtype: bfloat16                         # float32 | bfloat16
      device: cuda                            # cpu (gloo) | cuda (nccl, one GPU per rank)
    context_servers:
      tensor_parallel_size: 1                 # t ranks; prefill splits the heads over them
      kv_cache_config: {tokens_per_block: 32, max_tokens: 65536}   # dtype: the generation server's
      colocate: false                         # true: share generation rank 0's GPU (KV hand-over via host)
    generation_servers:                       # the keys of TensorRT-LLM's Helix documentation
      context_parallel_size: 2
      cp_config: {cp_type: HELIX, tokens_per_block: 32}
      kv_cache_config: {tokens_per_block: 32, max_tokens: 65536, dtype: auto}   # dtype: auto | fp8
      max_batch_size: 8

Rank layout: the context server's t ranks come first, then the N generation ranks; on CUDA rank r uses GPU r,
or, with ``colocate`` (t = 1), the context server uses GPU 0 beside generation rank 0 (N GPUs in all).
A file in TensorRT-LLM's own form (``trtllm-serve disaggregated -c``) is translated first (trtllm.py).
Every error is a ``ConfigError`` naming the key, the value and the rule (and the file, when there is one).
"""

from __future__ import annotations

import logging
import os

from helix.checkpoint import CheckpointError, check_checkpoint
from helix.config import ConfigError, HelixConfig, ModelConfig, check_split, fail
from helix.disagg.trtllm import translate
from helix.sources import is_synthetic, synthetic_config
from helix.spec import ContextServerConfig, Execution, RunSpec

SECTIONS = ("model", "context_servers", "generation_servers")
MODEL_KEYS = ("path", "dtype", "device")
CONTEXT_KEYS = ("tensor_parallel_size", "kv_cache_config", "colocate")
RUNTIME_DTYPES = ("float32", "bfloat16")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- parsing


def read_file(path: str | os.PathLike) -> dict:
    """The raw mapping of a YAML or JSON deployment file (JSON is YAML)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config={path!r}: no such deployment file")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config={path!r}: not valid YAML/JSON ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config={path!r}: expected a mapping with sections {list(SECTIONS)}")
    return raw


def load_deployment(config: "str | os.PathLike | dict | RunSpec") -> RunSpec:
    """A validated RunSpec from a deployment file's path, a dict of the file's content, or a RunSpec of a
    deployment (returned as is)."""
    if isinstance(config, RunSpec):
        if config.context is None:
            raise ConfigError("context_servers: required section; a deployment has a context server "
                              "(a RunSpec without one runs through helix.runner)")
        return config
    if isinstance(config, dict):
        return parse(config)
    path = os.fspath(config)
    try:
        return parse(read_file(path), source=path)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("config=") else f"{path}: {msg}") from None


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    if not isinstance(value, dict):
        fail(name, value, "required section (a mapping); see the README's deployment file example")
    return value


def _int(key: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fail(key, value, f"must be an integer >= {minimum}")
    return value


def from_checkpoint(model: str, *, cp: int = 2, tokens_per_block: int = 32, dtype: str = "float32",
                    device: str = "cpu", max_tokens: int | None = None, max_batch_size: int | None = None,
                    colocate: bool = False, kv_dtype: str = "auto", execution: Execution | None = None) -> RunSpec:
    """The deployment ``helix eval``, ``helix serve --model`` and the lm-eval adapter build from a checkpoint:
    context server 1 + Helix generation server N = ``cp``, both holding ``max_tokens`` per sequence in a KV cache of
    ``kv_dtype`` (auto: the model's, or fp8), with ``max_batch_size`` decode slots (None: the defaults), parsed and
    validated as the same deployment file would be."""
    tpb = {"tokens_per_block": tokens_per_block}
    # At least one block: the servers' rule (a max_length shorter than a block still gets its whole block).
    kv = tpb if max_tokens is None else {**tpb, "max_tokens": max(int(max_tokens), tokens_per_block)}
    generation = {"context_parallel_size": cp, "cp_config": {"cp_type": "HELIX", **tpb},
                  "kv_cache_config": {**kv, "dtype": kv_dtype}}
    if max_batch_size is not None:
        generation["max_batch_size"] = max_batch_size
    return parse({"model": {"path": model, "dtype": dtype, "device": device},
                  "context_servers": {"tensor_parallel_size": 1, "kv_cache_config": dict(kv), "colocate": colocate},
                  "generation_servers": generation}, execution=execution)


def deployment_dict(spec: RunSpec) -> dict:
    """The deployment file's content that ``parse`` turns back into ``spec`` (its execution aside)."""
    ctx, gen = spec.context, spec.generation
    return {"model": {"path": spec.model, "dtype": spec.dtype, "device": spec.device},
            "context_servers": {"tensor_parallel_size": ctx.tensor_parallel_size, "colocate": ctx.colocate,
                                "kv_cache_config": {"tokens_per_block": ctx.tokens_per_block,
                                                    "max_tokens": ctx.max_tokens}},
            "generation_servers": gen.to_dict()}


def parse(raw: dict, source: str | None = None, execution: Execution | None = None) -> RunSpec:
    """``execution`` None: the environment's defaults (``Execution.from_env``), read here, where the run starts.
    A file in TensorRT-LLM's form is translated first (helix/disagg/trtllm.py); the keys it holds that change
    nothing here are listed in one INFO line."""
    raw, inert = translate(raw)
    if inert:
        log.info("%s: TensorRT-LLM keys accepted that change nothing here (docs/design.md §4.5): %s",
                 source or "deployment", ", ".join(inert))
    for key in raw:
        if key not in SECTIONS:
            fail(key, raw[key], f"unknown section; a deployment file has {list(SECTIONS)}")
    model = raw.get("model")
    if isinstance(model, str):  # shorthand: `model: DIR`
        model = {"path": model}
    if not isinstance(model, dict):
        fail("model", model, "required section: {path: CHECKPOINT_DIR, dtype: float32|bfloat16, device: cpu|cuda}")
    for key in model:
        if key not in MODEL_KEYS:
            fail(f"model.{key}", model[key], f"unknown key; model takes {list(MODEL_KEYS)}")
    path, dtype, device = model.get("path"), model.get("dtype", "float32"), model.get("device", "cpu")
    if dtype not in RUNTIME_DTYPES:
        fail("model.dtype", dtype, f"must be one of {list(RUNTIME_DTYPES)} (the Helix runtime's compute dtypes)")
    if device not in ("cpu", "cuda"):
        fail("model.device", device, "must be 'cpu' (gloo) or 'cuda' (nccl, one GPU per rank)")
    model_cfg = _model_config(path)

    generation = HelixConfig.from_dict(_section(raw, "generation_servers"), prefix="generation_servers.")
    generation.validate_for_model(model_cfg, prefix="generation_servers.")
    context = _context_config(_section(raw, "context_servers"), generation, model_cfg)
    path = path if is_synthetic(path) else os.path.abspath(path)
    return RunSpec(model=path, dtype=dtype, device=device, generation=generation, context=context,
                   execution=execution or Execution.from_env(), source=source)


def _model_config(path) -> ModelConfig:
    if not isinstance(path, str) or not path:
        fail("model.path", path, "required: the checkpoint directory (config.json + *.safetensors + tokenizer files)")
    if is_synthetic(path):  # random weights drawn by each rank on its device (helix/sources.py)
        try:
            return synthetic_config(path)
        except ConfigError as e:
            raise ConfigError(f"model.path={path!r}: {e}") from None
    if not os.path.isdir(path):
        fail("model.path", path, "no such directory; point it at an HF checkpoint directory "
              "(write a synthetic one with `helix make-checkpoint --preset deepseek-v3-lite-tiny --out DIR`)")
    try:
        return check_checkpoint(path)  # a damaged file, a missing or mis-shaped tensor: named, before any rank starts
    except (CheckpointError, ConfigError) as e:
        raise ConfigError(f"model.path={path!r}: {e}") from None


def _context_config(raw: dict, generation: HelixConfig, model: ModelConfig) -> ContextServerConfig:
    for key in raw:
        if key not in CONTEXT_KEYS:
            fail(f"context_servers.{key}", raw[key], f"unknown key; context_servers takes {list(CONTEXT_KEYS)}")
    tp = _int("context_servers.tensor_parallel_size", raw.get("tensor_parallel_size", 1), 1)
    check_split(model, tp, generation.moe_parallel, "context_servers.tensor_parallel_size")  # prefill splits heads
    kv = raw.get("kv_cache_config") or {}
    if not isinstance(kv, dict):
        fail("context_servers.kv_cache_config", kv, "must be a mapping {tokens_per_block: T, max_tokens: M}")
    for key in kv:
        if key not in ("tokens_per_block", "max_tokens", "dtype"):
            fail(f"context_servers.kv_cache_config.{key}", kv[key],
                 "unknown key; takes tokens_per_block, max_tokens and dtype")
    if kv.get("dtype", generation.kv_dtype) != generation.kv_dtype:
        fail("context_servers.kv_cache_config.dtype", kv["dtype"],
             f"must equal generation_servers.kv_cache_config.dtype={generation.kv_dtype!r}: the context server writes "
             "the KV the generation server reads, and hands it over as stored")
    want = generation.tokens_per_block
    if "tokens_per_block" not in kv:
        fail("context_servers.kv_cache_config.tokens_per_block", None,
              f"required, and must equal generation_servers.cp_config.tokens_per_block={want}")
    tpb = _int("context_servers.kv_cache_config.tokens_per_block", kv["tokens_per_block"], 1)
    if tpb != want:
        fail("context_servers.kv_cache_config.tokens_per_block", tpb,
              f"must equal generation_servers.cp_config.tokens_per_block={want}: KV is handed over block by block "
              "to the generation rank that owns it")
    max_tokens = _int("context_servers.kv_cache_config.max_tokens", kv.get("max_tokens", generation.max_tokens), tpb)
    colocate = raw.get("colocate", False)
    if not isinstance(colocate, bool):
        fail("context_servers.colocate", colocate, "must be true or false")
    if colocate and tp != 1:
        fail("context_servers.colocate", colocate, f"needs tensor_parallel_size 1 (got {tp}): a colocated context "
             "server is one rank on generation rank 0's GPU")
    return ContextServerConfig(tensor_parallel_size=tp, tokens_per_block=tpb, max_tokens=max_tokens, colocate=colocate)
