"""Hugging Face checkpoints: the tensor schema, per-rank sliced loading, and the synthetic writer.

A checkpoint directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), ``generation_config.json`` and tokenizer files. Tensor names are the
on-disk names transformers uses for DeepSeek-V2/V3 (per-expert ``mlp.experts.{j}.*``).

``Checkpoint.get(name, dim, start, stop)`` reads only the requested slice through safetensors' lazy
slicing, so a rank of a 54 GB model never materialises tensors it does not own.

FP8 block-scaled checkpoints (DeepSeek-V3/R1's format, ``config.Fp8BlockScaling``): each ``*_proj.weight`` is
float8_e4m3fn with a float32 ``*_proj.weight_scale_inv`` [ceil(out / bm), ceil(in / bn)]; ``get`` reads the
slice's FP8 values and only the scale rows/columns of the blocks the slice touches, and returns
q * scale_inv in float32 (float64 when asked for), cast to the requested dtype. A scale block cut by a rank
boundary is read by both ranks and applied to each one's part, so every layout sees the same weights.

``make_checkpoint`` writes a synthetic checkpoint of a preset (``helix make-checkpoint``);
``ensure_checkpoint`` writes one on first use and reuses it after (the quick start's embedded default).
"""

from __future__ import annotations

import dataclasses
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
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from helix.config import Fp8BlockScaling, ModelConfig
from helix.fp8 import FP8, e4m3_scale, to_e4m3
from helix.presets import CONSTRUCTED, get_preset
from helix.tokenizer import with_byte_specials, write_byte_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CHECKPOINT_DTYPES = (*DTYPES, "fp8")  # what make_checkpoint writes: a dtype, or DeepSeek's FP8 block-scaled format


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


def block_scaled(name: str) -> bool:
    """Whether an FP8 checkpoint stores ``name`` as float8 with a scale: the linear projections. DeepSeek's format
    leaves the embedding, the norms, the router (``mlp.gate``, its bias) and lm_head unquantized."""
    return name.endswith("_proj.weight")


def scale_name(name: str) -> str:
    return name + "_scale_inv"


def scale_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Scale name -> [ceil(out / bm), ceil(in / bn)] for every block-scaled weight; empty unless FP8."""
    if cfg.quantization_config is None:
        return {}
    bm, bn = cfg.quantization_config.weight_block_size
    return {scale_name(n): (-(-s[0] // bm), -(-s[1] // bn)) for n, s in tensor_shapes(cfg).items() if block_scaled(n)}


def expand_blocks(scale: torch.Tensor, block: tuple[int, int], lead: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Per-block scales [r, c] -> per-element [shape], the first element sitting ``lead`` rows/columns into
    block (0, 0): block (i, j) covers rows i bm .. i bm + bm - 1 and columns j bn .. j bn + bn - 1."""
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[lead[0]:lead[0] + shape[0], lead[1]:lead[1] + shape[1]]


# --------------------------------------------------------------------------------------------- reading


class Checkpoint:
    """Lazy, sliced access to an HF checkpoint directory. Shapes are checked against the config's schema."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"model={self.path!r}: not a directory (expected an HF checkpoint directory)")
        self.config = ModelConfig.from_json(self.path)
        self.expected = tensor_shapes(self.config)
        self.scales = scale_shapes(self.config)  # FP8: the weight_scale_inv tensors
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
        want = self.expected.get(name, self.scales.get(name))
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is missing from {self.path} (expected shape {want})")
        sl = self._handle(self._file_of[name]).get_slice(name)
        shape = tuple(sl.get_shape())
        if want is not None and shape != want:
            raise CheckpointError(f"tensor {name!r}: checkpoint shape {shape} != shape {want} implied by config.json")
        stored, fp8 = sl.get_dtype(), self.config.quantization_config is not None
        if (stored == "F8_E4M3") != (fp8 and name in self.expected and block_scaled(name)):
            rule = ("config.json has no quantization_config (an FP8 checkpoint declares {quant_method: fp8, ...})"
                    if not fp8 else "quantization_config fp8 stores exactly the *_proj.weight tensors as F8_E4M3, "
                    "each with a float32 weight_scale_inv")
            raise CheckpointError(f"tensor {name!r}: stored as {stored}, but {rule}")
        return shape

    def _read(self, name: str, dim: int | None, start: int, stop: int | None) -> torch.Tensor:
        """Tensor ``name`` or its rows/columns [start, stop) along ``dim``, as stored."""
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
        return t

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None,
            dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor ``name`` (or rows/columns [start, stop) along ``dim``), read lazily, dequantized (FP8), cast,
        moved."""
        t = self._read(name, dim, start, stop)
        if t.dtype == FP8:
            t = self._dequantize(name, t, dim, start, dtype)
        if dtype is not None:
            t = t.to(dtype)
        return t.to(device)

    def _dequantize(self, name: str, q: torch.Tensor, dim: int | None, start: int, dtype: torch.dtype | None
                    ) -> torch.Tensor:
        """q: the FP8 rows/columns [start, start + q.shape[dim]) of ``name`` -> q * scale_inv in float32 (float64 if
        asked for: exact), reading only the scale rows/columns of the blocks the slice touches."""
        block = self.config.quantization_config.weight_block_size
        if dim is None:
            scale, lead = self._read(scale_name(name), None, 0, None), (0, 0)
        else:
            b = block[dim]
            scale = self._read(scale_name(name), dim, start // b, -(-(start + q.shape[dim]) // b))
            lead = tuple(start % b if d == dim else 0 for d in range(2))
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        return q.to(compute) * expand_blocks(scale, block, lead, q.shape).to(compute)

    def check_complete(self) -> None:
        """Every file's header is valid and every tensor the config implies (FP8: with its scale) is present with
        the right shape and storage."""
        for name in (*self.expected, *self.scales):
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
    tensors: int
    dtype: str

    def describe(self) -> str:
        return (f"{self.parameters:,} parameters ({_si(self.parameters)}) in {self.tensors} tensors, "
                f"{self.bytes:,} bytes ({_si(self.bytes)}B) as {self.dtype}")


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} "


def fp8_storage(name: str) -> torch.dtype:
    """What DeepSeek's FP8 format stores ``name`` as: FP8 projections, the float32 routing bias, bf16 otherwise."""
    if block_scaled(name):
        return FP8
    return torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q float8_e4m3fn [out, in], scale_inv float32 [ceil(out / bm), ceil(in / bn)]), each block
    scaled so that its largest magnitude maps to e4m3's 448 (DeepSeek's scheme); edge blocks are partial."""
    (bm, bn), (rows, cols) = block, w.shape
    grid = (-(-rows // bm), -(-cols // bn))
    padded = F.pad(w.float().abs(), (0, grid[1] * bn - cols, 0, grid[0] * bm - rows))  # zeros: no effect on amax
    scale = e4m3_scale(padded.view(grid[0], bm, grid[1], bn).amax(dim=(1, 3)))
    return to_e4m3(w, expand_blocks(scale, block, (0, 0), w.shape)), scale


def fp8_tensors(tensors: Iterator[tuple[str, torch.Tensor]], block: tuple[int, int]
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """The FP8 checkpoint of float ``tensors``: each projection quantized, followed by its scale."""
    for name, t in tensors:
        if block_scaled(name):
            q, scale = quantize_blocks(t, block)
            yield name, q
            yield scale_name(name), scale
        else:
            yield name, t.to(fp8_storage(name))


def preset_tensors(model: str | ModelConfig, cfg: ModelConfig, seed: int, dtype: str
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the checkpoint ``make_checkpoint`` writes for ``model``, in ``dtype`` (or FP8)."""
    if model in CONSTRUCTED:
        from helix.needle import needle_tensors  # imports the reference's RoPE: only when needed

        tensors = iter(needle_tensors(cfg).items())
    else:
        tensors = synthetic_tensors(cfg, seed)
    if dtype == "fp8":
        return fp8_tensors(tensors, cfg.quantization_config.weight_block_size)
    return ((name, t.to(DTYPES[dtype])) for name, t in tensors)


def checkpoint_bytes(cfg: ModelConfig, dtype: str) -> tuple[int, int]:
    """(bytes, tensors) of the checkpoint ``make_checkpoint`` writes for ``cfg`` in ``dtype``."""
    shapes = tensor_shapes(cfg)
    if dtype != "fp8":
        return sum(math.prod(s) for s in shapes.values()) * DTYPES[dtype].itemsize, len(shapes)
    scales = scale_shapes(cfg)
    return (sum(math.prod(s) * fp8_storage(n).itemsize for n, s in shapes.items())
            + sum(math.prod(s) for s in scales.values()) * 4, len(shapes) + len(scales))


def make_checkpoint(model: str | ModelConfig, out: str | os.PathLike, seed: int = 0, dtype: str = "bfloat16",
                    dry_run: bool = False, shard_bytes: int = 4 << 30) -> CheckpointPlan:
    """Write a complete synthetic HF checkpoint of preset name or config ``model`` into ``out``.

    Weights are random (seeded), except for the presets in ``presets.CONSTRUCTED`` named by their name, whose
    weights are written down (``helix.needle``) and take no seed. ``dtype`` "fp8" writes DeepSeek's FP8 format
    (``quantize_blocks``; 128 x 128 blocks unless ``model`` is a config with its own ``quantization_config``).

    Weights are generated and written one shard at a time, so a 54 GB model never sits in memory. The
    files go to a temporary sibling directory renamed onto ``out`` at the end: a directory at ``out`` is
    always complete. ``out`` must not exist or be empty.
    """
    cfg = get_preset(model) if isinstance(model, str) else model
    cfg = with_byte_specials(cfg)
    if dtype not in CHECKPOINT_DTYPES:
        raise CheckpointError(f"dtype={dtype!r}: choose one of {sorted(CHECKPOINT_DTYPES)}")
    if dtype == "fp8" and cfg.quantization_config is None:  # a config may bring its own weight_block_size
        cfg = dataclasses.replace(cfg, quantization_config=Fp8BlockScaling())
    if (dtype == "fp8") != (cfg.quantization_config is not None):
        raise CheckpointError(f"dtype={dtype!r}: a config with a quantization_config is written with dtype 'fp8'")
    parameters = sum(math.prod(s) for s in tensor_shapes(cfg).values())
    plan = CheckpointPlan(parameters, *checkpoint_bytes(cfg, dtype), dtype)
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
        write_safetensors(preset_tensors(model, cfg, seed, dtype), tmp, shard_bytes)
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
