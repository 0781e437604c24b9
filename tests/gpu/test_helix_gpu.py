"""Helix on CUDA GPUs with NCCL, bf16: MLA module and full-model parity, the MLA module at long context
(up to 1M tokens), and the CUDA-graph decode step replayed against eager execution.

Run with `nox -s gpu` on a machine with 2 or 4 GPUs; every test names the GPUs it needs."""

import dataclasses

import pytest
import torch

from helix.config import HelixConfig
from helix.engine import Request
from helix.reference import ReferenceModel
from helix.runner import helix_generate
from helix.sampling import SamplingParams
from helix.spec import Execution, RunSpec
from helix.workers import RankPool
from tests.gpu.long_context import reference_long, run_helix_long
from tests.helix_harness import check_bf16_teacher_forced, reference_mla, run_mla_module
from tests.tolerance import assert_bf16_policy, error_report, trtllm_pass_ratio

TPB = 32


@pytest.fixture(scope="module")
def gpu_pool():
    n = min(4, torch.cuda.device_count())
    with RankPool(n, [f"cuda:{i}" for i in range(n)]) as pool:
        yield pool


def _need(pool, n):
    if pool.world_size < n:
        pytest.skip(f"needs {n} GPUs, the pool has {pool.world_size}")


@pytest.mark.multi_gpu(2)
@pytest.mark.parametrize("n", [2, 4])
def test_mla_module_bf16_nccl(gpu_pool, checkpoint_factory, n):
    _need(gpu_pool, n)
    ckpt = checkpoint_factory(dtype="bfloat16")
    g = torch.Generator().manual_seed(n)
    contexts = [torch.randn(L, 96, generator=g, dtype=torch.float64).bfloat16().double() for L in (300, 45, 7)]
    decode_x = torch.randn(40, 3, 96, generator=g, dtype=torch.float64).bfloat16().double()
    _, ref64 = reference_mla(ckpt, torch.float64, contexts, decode_x)
    _, base = reference_mla(ckpt, torch.bfloat16, contexts, decode_x)
    _, out = gpu_pool.run(run_mla_module, str(ckpt), n, TPB, "bfloat16", contexts, decode_x, n=n)[0]
    err, base_err = assert_bf16_policy(out, ref64, base.double(), f"N={n} GPU bf16 MLA module")
    ratio = trtllm_pass_ratio(out, ref64)
    print(f"[MLA module] N={n} bf16 NCCL: max err {err:.3e} (plain bf16 torch {base_err:.3e}), "
          f"TensorRT-LLM criterion {100 * ratio:.2f}%")
    assert ratio >= 0.98


@pytest.mark.multi_gpu(2)
@pytest.mark.parametrize("n", [2, 4])
def test_full_model_bf16_nccl(gpu_pool, checkpoint_factory, n):
    """The reference's float64 greedy continuation is teacher-forced through Helix in bf16 and compared step by
    step with the float64 logits, the reference itself in bf16 being the baseline (tests/tolerance.py's
    model-level bf16 rule)."""
    _need(gpu_pool, n)
    ckpt = checkpoint_factory(dtype="bfloat16")
    prompts = [list(range(40, 140)), [5, 6, 7]]
    ref64 = ReferenceModel.from_checkpoint(ckpt, dtype=torch.float64)
    ref16 = ReferenceModel.from_checkpoint(ckpt, dtype=torch.bfloat16)
    conts = [ref64.generate(p, 48) for p in prompts]
    spec = RunSpec(model=str(ckpt), dtype="bfloat16", device="cuda",
                   generation=HelixConfig(context_parallel_size=n, tokens_per_block=TPB, max_tokens=256,
                                          max_batch_size=2),
                   execution=Execution(cuda_graphs=False))
    reqs = [Request(i, p, forced=c, keep_logits=True) for i, (p, c) in enumerate(zip(prompts, conts))]
    results = helix_generate(spec, reqs, gpu_pool)
    check_bf16_teacher_forced(ref64, ref16, prompts, conts, results, f"N={n} GPU bf16")


@pytest.mark.multi_gpu(2)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("seq_len", [131072, 1 << 20])
def test_mla_module_long_context(gpu_pool, n, seq_len):
    _need(gpu_pool, n)
    steps = 3
    out = gpu_pool.run(run_helix_long, n, 64, seq_len, steps, n=n)[0]
    ref32 = reference_long(seq_len, steps, torch.float32, "cuda:0")
    base = reference_long(seq_len, steps, torch.bfloat16, "cuda:0")
    err, base_err = assert_bf16_policy(out.double(), ref32.double(), base.double(), f"N={n} S={seq_len}")
    ratio = trtllm_pass_ratio(out, ref32)
    print(f"[long context] N={n} S={seq_len}: max err {err:.3e} (plain bf16 torch {base_err:.3e}), "
          f"TensorRT-LLM criterion {100 * ratio:.2f}%, mismatch ratio {100 * (1 - ratio):.2f}%")
    assert ratio >= 0.98


@pytest.mark.multi_gpu(2)
def test_cuda_graph_replay_matches_eager(gpu_pool, checkpoint_factory):
    ckpt = checkpoint_factory(dtype="bfloat16")
    reqs = [Request(0, list(range(40, 100)), SamplingParams(max_new_tokens=40), keep_logits=True),
            Request(1, [7, 8, 9], SamplingParams(max_new_tokens=40), keep_logits=True)]
    spec = RunSpec(model=str(ckpt), dtype="bfloat16", device="cuda",
                   generation=HelixConfig(context_parallel_size=2, tokens_per_block=8, max_tokens=128,
                                          max_batch_size=2))
    eager = helix_generate(dataclasses.replace(spec, execution=Execution(cuda_graphs=False)), reqs, gpu_pool)
    graph = helix_generate(spec, reqs, gpu_pool)
    for e, g in zip(eager, graph):
        assert g.token_ids == e.token_ids, f"request {e.req_id}: graph tokens differ from eager"
        mx, _, _, text = error_report(torch.stack(g.logits), torch.stack(e.logits))
        print(f"[cuda graph] request {e.req_id}: {len(g.token_ids)} steps replayed; logits vs eager: {text}")
        assert mx <= 1e-2 * float(torch.stack(e.logits).abs().max())
