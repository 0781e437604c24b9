"""Hugging Face checkpoints: the tensor schema, per-rank sliced loading, and the synthetic writer.

A checkpoint directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), ``generation_config.json`` and tokenizer files. Tensor names are the
on-disk names transformers uses for DeepSeek-V2/V3 (per-expert ``mlp.experts.{j}.*``).

``Checkpoint.get(name, dim, start, stop)`` reads only the requested slice through safetensors' lazy
slicing, so a rank of a 54 GB model never materialises tensors it does not own.

``make_checkpoint`` writes a synthetic checkpoint of a preset (``helix make-checkpoint``);
``ensure_checkpoint`` writes one on first use and reuses it after (the quick start's embedded default).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from helix.config import ModelConfig
from helix.presets import CONSTRUCTED, get_preset
from helix.tokenizer import with_byte_specials, write_byte_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A missing tensor, a shape mismatch or a malformed checkpoint directory."""


# --------------------------------------------------------------------------------------------- schema


def layer_tensor_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """On-disk name -> shape for one decoder layer."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    p = f"model.layers.{layer}."
    s: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (D,),
        p + "post_attention_layernorm.weight": (D,),
        p + "self_attn.kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D),
        p + "self_attn.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        p + "self_attn.kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        p + "self_attn.o_proj.weight": (D, H * cfg.v_head_dim),
    }
    if cfg.q_lora_rank:
        s[p + "self_attn.q_a_proj.weight"] = (cfg.q_lora_rank, D)
        s[p + "self_attn.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        s[p + "self_attn.q_b_proj.weight"] = (H * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        s[p + "self_attn.q_proj.weight"] = (H * cfg.qk_head_dim, D)

    def mlp(prefix: str, inter: int) -> None:
        s[prefix + "gate_proj.weight"] = (inter, D)
        s[prefix + "up_proj.weight"] = (inter, D)
        s[prefix + "down_proj.weight"] = (D, inter)

    if cfg.is_moe_layer(layer):
        s[p + "mlp.gate.weight"] = (cfg.n_routed_experts, D)
        if cfg.model_type == "deepseek_v3":
            s[p + "mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for j in range(cfg.n_routed_experts):
            mlp(f"{p}mlp.experts.{j}.", cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            mlp(p + "mlp.shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts)
    else:
        mlp(p + "mlp.", cfg.intermediate_size)
    return s


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """On-disk name -> shape for the whole model (MTP layers are not part of the decode model)."""
    s = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_hidden_layers):
        s.update(layer_tensor_shapes(cfg, layer))
    s["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return s


# --------------------------------------------------------------------------------------------- reading


class Checkpoint:
    """Lazy, sliced access to an HF checkpoint directory. Shapes are checked against the config's schema."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"model={self.path!r}: not a directory (expected an HF checkpoint directory)")
        self.config = ModelConfig.from_json(self.path)
        self.expected = tensor_shapes(self.config)
        self._handles: dict[str, object] = {}
        self._file_of = self._index()
        self.bytes_read = 0  # bytes materialised by get(); tests use it to prove slicing reads little

    def _index(self) -> dict[str, str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                try:
                    return {k: os.path.join(self.path, v) for k, v in json.load(f)["weight_map"].items()}
                except (ValueError, KeyError, AttributeError):
                    raise CheckpointError(f"{index}: not a JSON object with a weight_map {{tensor: file}}") from None
        single = os.path.join(self.path, "model.safetensors")
        if not os.path.exists(single):
            raise CheckpointError(f"model={self.path!r}: holds neither model.safetensors nor model.safetensors.index.json")
        return {k: single for k in self._handle(single).keys()}

    def _handle(self, file: str):
        """The open file. safe_open reads the header and checks that its tensors cover the whole file, so a
        truncated or corrupt file fails here, named, before any weight is read."""
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, "pt")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: missing, but listed in model.safetensors.index.json") from None
            except SafetensorError as e:
                raise CheckpointError(f"{file}: not a valid safetensors file ({e}): truncated or corrupt; write or "
                                      "download it again") from None
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._file_of:
            want = self.expected.get(name)
            raise CheckpointError(f"tensor {name!r} is missing from {self.path} (expected shape {want})")
        shape = tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())
        want = self.expected.get(name)
        if want is not None and shape != want:
            raise CheckpointError(f"tensor {name!r}: checkpoint shape {shape} != shape {want} implied by config.json")
        return shape

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None,
            dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor ``name`` (or rows/columns [start, stop) along ``dim``), read lazily, cast, moved."""
        shape = self.shape(name)
        sl = self._handle(self._file_of[name]).get_slice(name)
        if dim is None:
            t = sl[:]
        else:
            stop = shape[dim] if stop is None else stop
            if not 0 <= start <= stop <= shape[dim]:
                raise CheckpointError(f"tensor {name!r}: slice [{start}:{stop}] along dim {dim} is outside shape {shape}")
            index = tuple([slice(None)] * dim + [slice(start, stop)])
            t = sl[index]
        self.bytes_read += t.numel() * t.element_size()
        if dtype is not None:
            t = t.to(dtype)
        return t.to(device)

    def check_complete(self) -> None:
        """Every file's header is valid and every tensor the config implies is present with the right shape."""
        for name in self.expected:
            self.shape(name)

    def close(self) -> None:
        self._handles.clear()


def check_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """The config of the checkpoint at ``path`` once ``check_complete`` passed, reading headers only: a driver
    calls it before starting ranks, so that a bad checkpoint ends the command in one line instead of failing
    inside a rank with a traceback."""
    ckpt = Checkpoint(path)
    ckpt.check_complete()
    ckpt.close()
    return ckpt.config


# --------------------------------------------------------------------------------------------- synthetic


@dataclass
class SyntheticInit:
    """Std of each random weight class, chosen so activations stay O(1) over thousands of tokens.

    Projections use 1/sqrt(fan_in); residual-branch outputs are scaled down by sqrt(2 * layers) so the
    residual stream grows slowly; RMSNorm weights sit near 1; routing biases are small so top-k picks vary.
    """

    embed_std: float = 1.0
    norm_jitter: float = 0.1
    bias_std: float = 0.05
    logit_scale: float = 3.0  # lm_head std * sqrt(D): logits spread over a few units, few near-ties


def synthetic_tensor(name: str, shape: tuple[int, ...], cfg: ModelConfig, gen: torch.Generator,
                     init: SyntheticInit = SyntheticInit()) -> torch.Tensor:
    """Random float32 tensor on the generator's device."""
    def randn():
        return torch.randn(shape, generator=gen, device=gen.device)

    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0 + init.norm_jitter * randn()
    if name.endswith("e_score_correction_bias"):
        return init.bias_std * randn()
    if name == "model.embed_tokens.weight":
        return init.embed_std * randn()
    fan_in = shape[-1]
    std = 1.0 / math.sqrt(fan_in)
    if name == "lm_head.weight":
        std *= init.logit_scale
    elif name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.num_hidden_layers)
    return std * randn()


def synthetic_tensors(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in schema order; one generator per tensor so any subset is reproducible alone."""
    for idx, (name, shape) in enumerate(tensor_shapes(cfg).items()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        yield name, synthetic_tensor(name, shape, cfg, gen).to(dtype)


class SyntheticCheckpoint:
    """The ``Checkpoint`` interface over random weights made on ``device`` on request, never written to disk:
    a rank of a 54 GB model gets its slices in seconds (benchmarks). Each tensor is drawn whole from a
    generator seeded by (seed, name) and then sliced, so every layout sees the same weights."""

    def __init__(self, config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
        self.config, self.seed, self.device = config, seed, torch.device(device)
        self.expected = tensor_shapes(config)
        self.path = f"<synthetic {config.model_type} seed={seed}>"
        self.bytes_read = 0

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None,
            dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        if name not in self.expected:
            raise CheckpointError(f"tensor {name!r} is not part of a {self.config.model_type} model")
        shape = self.expected[name]
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        t = synthetic_tensor(name, shape, self.config, gen)
        if dim is not None:
            t = t.narrow(dim, start, (shape[dim] if stop is None else stop) - start)
        t = t.to(dtype or torch.float32).contiguous()
        self.bytes_read += t.numel() * t.element_size()
        return t.to(device or self.device)

    def close(self) -> None:
        pass


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: str, shard_bytes: int = 4 << 30) -> None:
    """Write ``model.safetensors`` or, past ``shard_bytes``, shards plus ``model.safetensors.index.json``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[list[str]] = [[]]
    files: list[str] = []

    def flush(final: bool) -> None:
        nonlocal size
        i = len(files)
        files.append(f"model-{i + 1:05d}.safetensors")
        save_file(shards[-1], os.path.join(out, files[-1]), metadata={"format": "pt"})
        shards[-1] = {}
        size = 0
        if not final:
            names.append([])

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush(final=False)
        shards[-1][name] = t.contiguous()
        names[-1].append(name)
        size += nbytes
    flush(final=True)
    if len(files) == 1:
        os.replace(os.path.join(out, files[0]), os.path.join(out, "model.safetensors"))
        return
    total = len(files)
    weight_map = {}
    for i, (f, ns) in enumerate(zip(files, names)):
        final_name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(out, f), os.path.join(out, final_name))
        weight_map.update({n: final_name for n in ns})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=1)


# --------------------------------------------------------------------------------------------- writing


DEFAULT_PRESET = "deepseek-v3-lite-tiny"  # the embedded default model of the quick start


@dataclass
class CheckpointPlan:
    """What ``make_checkpoint`` writes (or, with ``dry_run``, would write)."""

    parameters: int
    bytes: int
    dtype: str
    tensors: int

    def describe(self) -> str:
        return (f"{self.parameters:,} parameters ({_si(self.parameters)}) in {self.tensors} tensors, "
                f"{self.bytes:,} bytes ({_si(self.bytes)}B) as {self.dtype}")


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} "


def preset_tensors(model: str | ModelConfig, cfg: ModelConfig, seed: int, dtype: torch.dtype
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the checkpoint ``make_checkpoint`` writes for ``model``."""
    if model in CONSTRUCTED:
        from helix.needle import needle_tensors  # imports the reference's RoPE: only when needed

        return ((name, t.to(dtype)) for name, t in needle_tensors(cfg).items())
    return synthetic_tensors(cfg, seed, dtype)


def make_checkpoint(model: str | ModelConfig, out: str | os.PathLike, seed: int = 0, dtype: str = "bfloat16",
                    dry_run: bool = False, shard_bytes: int = 4 << 30) -> CheckpointPlan:
    """Write a complete synthetic HF checkpoint of preset name or config ``model`` into ``out``.

    Weights are random (seeded), except for the presets in ``presets.CONSTRUCTED`` named by their name, whose
    weights are written down (``helix.needle``) and take no seed.

    Weights are generated and written one shard at a time, so a 54 GB model never sits in memory. The
    files go to a temporary sibling directory renamed onto ``out`` at the end: a directory at ``out`` is
    always complete. ``out`` must not exist or be empty.
    """
    cfg = get_preset(model) if isinstance(model, str) else model
    cfg = with_byte_specials(cfg)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    shapes = tensor_shapes(cfg)
    parameters = sum(math.prod(s) for s in shapes.values())
    plan = CheckpointPlan(parameters, parameters * DTYPES[dtype].itemsize, dtype, len(shapes))
    if dry_run:
        return plan
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"out={out!r}: already exists and is not an empty directory; remove it or choose another")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f, indent=1)
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=1)
        write_byte_tokenizer(tmp, cfg.max_position_embeddings)
        write_safetensors(preset_tensors(model, cfg, seed, DTYPES[dtype]), tmp, shard_bytes)
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan


def helix_home() -> str:
    """Where embedded default checkpoints live: ``$HELIX_HOME``, else ``~/.cache/helix``."""
    return os.environ.get("HELIX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "helix")


def ensure_checkpoint(preset: str = DEFAULT_PRESET, path: str | os.PathLike | None = None, seed: int = 0,
                      dtype: str = "bfloat16") -> str:
    """The synthetic checkpoint of ``preset`` at ``path`` (default ``helix_home()/preset``), written on first use.

    ``make_checkpoint`` renames a finished directory into place, so an existing directory is complete; when
    two processes race, the loser's rename fails and it uses the winner's checkpoint.
    """
    path = os.fspath(path) if path is not None else os.path.join(helix_home(), preset)
    if os.path.isdir(path) and os.listdir(path):
        return path
    log.info("writing the %s synthetic checkpoint to %s (first use)", preset, path)
    try:
        make_checkpoint(preset, path, seed=seed, dtype=dtype)
    except (CheckpointError, OSError):
        if not (os.path.isdir(path) and os.listdir(path)):
            raise
    return path
