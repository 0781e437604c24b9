"""Sessions: demo (the quick start's `helix generate`), unit (CPU suite), e2e_accuracy (MMLU/GSM8K and the
needle task through disaggregated Helix), gpu, bench.

CPU sessions pin torch 2.13.0 (the CPU build); an unpinned torch would pull a multi-GB CUDA build.
GPU sessions reuse the machine's own torch (``venv_params=["--system-site-packages"]``).
"""

import os
import sys

import nox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helix.gpu_env import GPU_SAFE_ENV  # noqa: E402  (torch-free: nox's own interpreter has no torch)

nox.options.sessions = ["unit"]
nox.options.reuse_existing_virtualenvs = True

CPU_TORCH = "torch==2.13.0"


def _install_cpu(session, *extras):
    session.install(CPU_TORCH)
    spec = ".[" + ",".join(extras) + "]" if extras else "."
    session.install("-e", spec)


@nox.session(python="3.11")
def unit(session):
    """Everything CPU-runnable (Triton kernels through the interpreter, on CPU tensors), `pytest -n 2`; the 15
    slowest tests are listed at the end."""
    _install_cpu(session, "test", "eval", "serve")
    session.run(
        "pytest", "-n", "2", "-m", "not gpu and not multi_gpu and not slow", "--durations", "15", *session.posargs,
        env={"OMP_NUM_THREADS": "1"},
    )


@nox.session(python="3.11")
def demo(session):
    """`helix generate` on the embedded default (the tiny synthetic checkpoint, written on first use)."""
    _install_cpu(session)
    args = session.posargs or ["--prompt", "Helix shards the KV cache along the sequence.", "--max-new-tokens", "32"]
    session.run("helix", "generate", *args, "--json")


@nox.session(python="3.11")
def e2e_accuracy(session):
    """MMLU + GSM8K, then niah_restated on the needle checkpoint, through context server + Helix generation server
    vs the reference (`helix eval`)."""
    _install_cpu(session, "eval")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if os.environ.get("HELIX_EVAL_DATA") else {}
    session.run("helix", "eval", *session.posargs, env=env)




@nox.session(venv_params=["--system-site-packages"])
def gpu(session):
    """GPU and multi-GPU tests on the machine's own CUDA torch."""
    session.install("--no-deps", "--no-build-isolation", "-e", ".")  # GPU hosts may be offline
    session.run("pytest", "-m", "gpu or multi_gpu", *session.posargs, env=GPU_SAFE_ENV)


@nox.session(venv_params=["--system-site-packages"])
def bench(session):
    """`nox -s bench -- kernels` runs the kernel roofline benchmark; otherwise the decode benchmark."""
    session.install("--no-deps", "--no-build-isolation", "-e", ".")  # GPU hosts may be offline
    if session.posargs[:1] == ["kernels"]:
        session.run("python", "-m", "kernels.bench", *session.posargs[1:], env=GPU_SAFE_ENV)
    else:
        session.run("helix", "bench", *session.posargs, env=GPU_SAFE_ENV)
