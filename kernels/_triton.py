"""Triton import, path selection and the CPU interpreter hook shared by the kernels.

Path rule (one for every kernel in this package; each kernel takes ``path``, a run's ``Execution.kernels``,
whose default the command reads from ``HELIX_KERNELS``):

* ``torch``  -> the torch reference, whatever the device;
* ``triton`` -> the Triton kernel; on CPU tensors it runs under Triton's interpreter;
* ``cuda``   -> the kernel's CUDA C++ version where it has one (``mla_decode``: kernels/mla_decode.cu), its
  Triton kernel otherwise; CUDA tensors only;
* ``auto`` (default) -> on CUDA tensors the fastest GPU kernel measured for the call's shape (each kernel's
  wrapper says which), the torch reference otherwise.

The interpreter is chosen per call (CPU tensors, or ``TRITON_INTERPRET=1`` in the environment), not at
import time: ``triton.jit`` decides interpret-vs-compile when the module is imported, and under pytest
another test module may import ``kernels`` before any test could set the variable.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # a CPU-only install without triton: the torch references still work
    HAS_TRITON = False

    class _Missing:
        constexpr = None  # used only in annotations of kernels that are never launched

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Missing()  # type: ignore[assignment]

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TENSOR_DESCRIPTOR = True
except ImportError:
    TensorDescriptor = None
    HAS_TENSOR_DESCRIPTOR = False

PATHS = ("auto", "cuda", "triton", "torch")


def use_triton(t: torch.Tensor, path: str = "auto") -> bool:
    """Whether a call on tensors living where ``t`` lives takes a GPU kernel (Triton, or CUDA C++ where the
    kernel has one) rather than the torch reference."""
    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {', '.join(PATHS)}")
    if path == "torch":
        return False
    if path == "cuda" and not t.is_cuda:
        raise ValueError(f"path='cuda' needs CUDA tensors, got {t.device}")
    if path == "triton":
        if not HAS_TRITON:
            raise RuntimeError("path='triton' but triton is not installed")
        return True
    return t.is_cuda and HAS_TRITON


def interpreting(t: torch.Tensor) -> bool:
    """Run a Triton kernel under the interpreter: CPU tensors, or TRITON_INTERPRET=1."""
    return (not t.is_cuda) or os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED: dict[int, object] = {}  # id(JITFunction) -> InterpretedFunction (JITFunction hashing parses source)


def _interpreted(jit_fn):
    from triton.runtime.interpreter import InterpretedFunction

    key = id(jit_fn)
    if key not in _INTERPRETED:
        _INTERPRETED[key] = (jit_fn, InterpretedFunction(getattr(jit_fn, "fn", jit_fn)))
    return _INTERPRETED[key][1]


class _Interpreted:
    """A grid launch of ``jit_fn``'s source under Triton's interpreter, for a kernel that was decorated
    while TRITON_INTERPRET was unset. The kernel's calls into triton.language helpers that are themselves
    ``@triton.jit`` functions (``tl.cdiv``, ``tl.max``, ``tl.sum``, ...) are routed for the duration of
    the launch through the interpreter's device-call path, exactly as if TRITON_INTERPRET=1 had been set
    before triton was imported. CPU-only (tests); single-threaded use."""

    def __init__(self, jit_fn, grid):
        self.fn, self.grid = _interpreted(jit_fn), grid

    def __call__(self, *args, **kwargs):
        from triton.runtime.jit import JITFunction

        saved = JITFunction.__call__
        JITFunction.__call__ = lambda f, *a, **k: _interpreted(f)(*a, **k)
        try:
            return self.fn[self.grid](*args, **kwargs)
        finally:
            JITFunction.__call__ = saved


class _InterpretedLauncher:
    def __init__(self, jit_fn):
        self.jit_fn = jit_fn

    def __getitem__(self, grid):
        return _Interpreted(self.jit_fn, grid)


def launcher(jit_fn, interpret: bool):
    """The object to index with a grid: the compiled kernel, or the same source under the interpreter."""
    if not interpret:
        return jit_fn
    if type(jit_fn).__name__ == "InterpretedFunction":  # imported with TRITON_INTERPRET=1 already set
        return jit_fn
    return _InterpretedLauncher(jit_fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def capability(device_index: int) -> tuple[int, int]:
    """The GPU's compute capability, queried once (kernel wrappers ask on every call)."""
    return torch.cuda.get_device_capability(device_index)


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU; a small fixed number under the interpreter so that the
    split logic is exercised on CPU without launching thousands of interpreted programs."""
    if not t.is_cuda:
        return 4
    return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
