"""Roofline benchmark of the kernels (docs/design.md §8): ``python -m kernels.bench [--out DIR]``.

For H in {16, 32, 128}, B in {1, 8}, S in {64K, 256K, 1M} (bf16, Lkv 512, R 64, 64 tokens per block,
shuffled block table) it times

* ``mla_decode`` (its default path: the CUDA kernel where ``mla_decode.cuda_auto`` prefers it, Triton otherwise), and
* a plain-torch absorbed decode: einsums over the cache already gathered into a contiguous
  [B, S, Lkv + R] tensor (the gather is not timed), softmax in float32,

each as the median of CUDA-graph replays timed with CUDA events, and reports KV bytes read, FLOPs =
2*B*H*S*(2*Lkv + R), GB/s, TFLOP/s and time / floor, where floor = max(KV bytes / read bandwidth, FLOPs /
bf16 matmul rate), both ceilings measured in the same run (read bandwidth: the best read-only stream over a
few kernels and sizes; the device-to-device copy, read + write, is reported beside it). It also
times ``helix_combine`` at B in {1, 32}, h in {16, 128}, N in {2, 4, 8}, and with ``--sweep`` a few launch
shapes of the Triton and CUDA split kernels at S = 1M, B = 1. Writes kernels-<card>.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kernels import helix_combine, mla_decode
from kernels._triton import tl, triton
from kernels.mla_decode import (CUDA_MMA_SYNC_CONFIG, CUDA_SM90_CONFIG, MLAConfig, auto_path, cuda_auto, cuda_config,
                                 default_config, flops, kv_bytes, mla_decode_cuda, mla_decode_triton)

LKV, R, TPB = 512, 64, 64
DT = torch.bfloat16


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------- timing
def time_graph(fn, replays: int = 30, warmup: int = 3) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph, each replay between events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warmup):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del g
    return statistics.median(times)


def time_graph_batched(fn, inner: int = 20, replays: int = 20) -> float:
    """For microsecond kernels: ``inner`` calls in one graph, median replay / inner."""
    def many():
        for _ in range(inner):
            fn()
    return time_graph(many, replays=replays) / inner


@triton.jit
def _read_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Read-only stream: each program sums UNROLL * BLOCK consecutive elements (UNROLL independent 16-byte
    loads per thread in flight) and writes one float."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * UNROLL
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(UNROLL):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


READ_GIB = (1, 2, 4)                  # buffer sizes, several times the 50-60 MB L2
READ_SHAPES = ((2048, 8, 8), (4096, 4, 8), (2048, 16, 16))  # (BLOCK, UNROLL, num_warps) of the Triton stream


def measure_read_bandwidth() -> dict:
    """Best read-only rate (bytes read / s) over buffer sizes and read kernels: the Triton stream above
    at a few shapes and torch's float32-accumulated sum. Each kernel's sum is checked against a float64
    sum of the same buffer, so a kernel that skipped bytes cannot report a rate."""
    rates = {}
    for gib in READ_GIB:
        n = gib << 29  # bf16 elements
        x = torch.empty(n, device="cuda", dtype=DT).normal_()
        want = float(x.sum(dtype=torch.float64))
        tol = 1e-2 * math.sqrt(n)  # a sum of n normals is ~sqrt(n): skipping even 1% of them moves it more
        runs = {"torch.sum": lambda: x.sum(dtype=torch.float32)}
        for block, unroll, warps in READ_SHAPES:
            parts = torch.empty(triton.cdiv(n, block * unroll), device="cuda", dtype=torch.float32)
            grid = (parts.numel(),)

            def stream(parts=parts, grid=grid, block=block, unroll=unroll, warps=warps):
                _read_sum_kernel[grid](x, parts, n, BLOCK=block, UNROLL=unroll, num_warps=warps)
                return parts

            runs[f"triton b{block}/u{unroll}/w{warps}"] = stream
        for name, fn in runs.items():
            got = float(fn().double().sum())
            if abs(got - want) > tol:
                raise RuntimeError(f"read kernel {name} summed {got}, expected {want}: it skipped bytes")
            rates[f"{name} {gib} GiB"] = n * 2 / time_graph(fn, replays=20)
        del x
        torch.cuda.empty_cache()
    best = max(rates, key=rates.get)
    return {"read_GBps": rates[best] / 1e9, "read_best": best,
            "read_rates_GBps": {k: round(v / 1e9, 1) for k, v in rates.items()}}


def measure_ceilings() -> dict:
    """The card's ceilings, measured now: read bandwidth (best read-only kernel, the floor's rate for
    bytes read), device-to-device copy counted as read + write (reference only), bf16 matmul rate."""
    out = measure_read_bandwidth()
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.randn(n, device="cuda", dtype=torch.float32).to(DT)
    dst = torch.empty_like(src)
    t_copy = time_graph(lambda: dst.copy_(src), replays=20)
    copy_bw = 2 * src.numel() * src.element_size() / t_copy
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=DT)
    b = torch.randn(m, m, device="cuda", dtype=DT)
    c = torch.empty(m, m, device="cuda", dtype=DT)
    t_mm = time_graph(lambda: torch.matmul(a, b, out=c), replays=20)
    mm = 2 * m ** 3 / t_mm
    del a, b, c
    torch.cuda.empty_cache()
    return {**out, "copy_GBps": copy_bw / 1e9, "matmul_TFLOPs": mm / 1e12, "copy_s": t_copy, "matmul_s": t_mm}


def floor_s(read_bytes: float, flops: float, ceilings: dict) -> tuple[float, float, float]:
    """(floor, bytes term, FLOPs term) in seconds: max(bytes read / read bandwidth, FLOPs / bf16 matmul
    rate). Decode writes are a few KB per call (o, lse) and are not counted."""
    t_bytes = read_bytes / (ceilings["read_GBps"] * 1e9)
    t_flops = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    return max(t_bytes, t_flops), t_bytes, t_flops


# -------------------------------------------------------------------------------------- decode setup
class Workspace:
    """One random bf16 paged cache big enough for the largest (B, S); smaller runs take a prefix."""

    def __init__(self, max_tokens: int):
        self.blocks = max_tokens // TPB
        self.kv = torch.empty(self.blocks, TPB, LKV + R, device="cuda", dtype=DT)
        chunk = 1 << 12
        for i in range(0, self.blocks, chunk):
            self.kv[i:i + chunk].normal_()

    def inputs(self, bsz: int, seq: int, heads: int, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        nb = seq // TPB
        perm = torch.randperm(bsz * nb, device="cuda", generator=g)  # shuffled pages
        table = perm.view(bsz, nb).to(torch.int32)
        lens = torch.full((bsz,), seq, dtype=torch.int32, device="cuda")
        qn = torch.randn(bsz, heads, LKV, device="cuda", generator=g).to(DT)
        qp = torch.randn(bsz, heads, R, device="cuda", generator=g).to(DT)
        return qn, qp, self.kv[: bsz * nb], table, lens, 1.0 / math.sqrt(192)


def torch_decode(qn, qp, kv_contig, scale):
    """Plain-torch absorbed decode over a contiguous [B, S, Lkv + R] cache."""
    c, k_pe = kv_contig[..., :LKV], kv_contig[..., LKV:]
    s = (torch.einsum("bhl,bsl->bhs", qn, c) + torch.einsum("bhr,bsr->bhs", qp, k_pe)).float() * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(qn.dtype)
    return torch.einsum("bhs,bsl->bhl", p, c), lse


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def figures(t, bsz, heads, seq, ceil) -> dict:
    by, fl = kv_bytes(bsz, seq, LKV, R, 2), flops(bsz, heads, seq, LKV, R)
    floor, t_bw, t_fl = floor_s(by, fl, ceil)
    return {"us": t * 1e6, "GBps": by / t / 1e9, "TFLOPs": fl / t / 1e12, "floor_us": floor * 1e6,
            "floor_bytes_us": t_bw * 1e6, "floor_flops_us": t_fl * 1e6, "x_floor": t / floor,
            "pct_read_bw": 100 * by / t / 1e9 / ceil["read_GBps"],
            "pct_matmul": 100 * fl / t / 1e12 / ceil["matmul_TFLOPs"]}


def _c(h, n, w, st, p, tma=True):
    return "triton", MLAConfig(block_h=h, block_n=n, num_warps=w, num_stages=st, programs_per_sm=p, tma=tma)


def _cuda(st, p=1):
    """The CUDA kernel: the wgmma one at 2 stages, the mma.sync one at 3 to 5."""
    return "cuda", replace(CUDA_SM90_CONFIG if st == 2 else CUDA_MMA_SYNC_CONFIG, num_stages=st, programs_per_sm=p)


SPLIT_KERNELS = {"triton": mla_decode_triton, "cuda": mla_decode_cuda}
SWEEP = {  # (path, launch shape). The first Triton entry of each list is kernels.mla_decode.default_config; the
    # last Triton entry is the default before TMA tiles (issue 15); the CUDA kernels (wgmma: Hopper only; mma.sync at
    # its pipeline depths)
    16: [_c(16, 32, 4, 3, 2), _c(16, 64, 4, 2, 2), _c(64, 64, 8, 2, 1), _c(16, 64, 4, 2, 2, tma=False),
         _cuda(2), _cuda(4), _cuda(5)],
    32: [_c(64, 64, 8, 2, 1), _c(32, 64, 8, 2, 1), _c(32, 32, 8, 3, 1), _c(16, 32, 4, 3, 2), _c(32, 32, 4, 3, 2, tma=False),
         _cuda(2), _cuda(3), _cuda(4), _cuda(5), _cuda(4, 2)],
    128: [_c(64, 64, 8, 2, 1), _c(64, 64, 8, 3, 1), _c(64, 64, 8, 2, 1, tma=False), _cuda(2), _cuda(4)],
}


def cfg_str(path: str, c: MLAConfig) -> str:
    if path == "cuda":
        kernel = "wgmma" if c.block_h == CUDA_SM90_CONFIG.block_h else "mma.sync"
        return f"cuda {kernel} s{c.num_stages}/p{c.programs_per_sm}"
    return f"h{c.block_h}/n{c.block_n}/w{c.num_warps}/s{c.num_stages}/p{c.programs_per_sm}" + ("/tma" if c.tma else "")


def default_launch(heads: int) -> str:
    """What ``mla_decode``'s auto path runs at ``heads`` for the bench's bf16 cache."""
    dev = torch.device("cuda")
    if cuda_auto(heads, dev):
        return cfg_str("cuda", cuda_config(dev))
    return cfg_str("triton", default_config(heads, LKV, DT, False))


def run_sweep(ws, ceil, heads_list, seq, deadline) -> list[dict]:
    rows = []
    for heads in heads_list:
        qn, qp, kv, bt, sl, scale = ws.inputs(1, seq, heads, seed=heads)
        ref = torch_decode(qn, qp, kv[bt.long()].view(1, seq, LKV + R), scale)[0]
        for path, cfg in SWEEP[heads]:
            if time.time() > deadline:
                log("sweep: out of time")
                return rows
            kernel = SPLIT_KERNELS[path]
            row = {"H": heads, "B": 1, "S": seq, "config": cfg_str(path, cfg), "_cfg": (path, cfg),
                   "kv_bytes": kv_bytes(1, seq, LKV, R, 2), "flops": flops(1, heads, seq, LKV, R)}
            try:
                st: dict = {}
                o, _ = kernel(qn, qp, kv, bt, sl, scale, config=cfg, stats=st)
                torch.cuda.synchronize()
                row["rel_err_vs_torch"] = rel_err(o, ref)
                row.update({k: v for k, v in st.items() if k != "grid"})
                t = time_graph(lambda: kernel(qn, qp, kv, bt, sl, scale, config=cfg))
                row.update(figures(t, 1, heads, seq, ceil))
            except Exception as e:  # noqa: BLE001 - a launch shape that does not fit is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            log("sweep", json.dumps(row, default=str))
            rows.append(row)
        del ref
        torch.cuda.empty_cache()
    return rows


def best_configs(sweep: list[dict]) -> dict:
    """Fastest correct (path, launch shape) per head count."""
    best: dict = {}
    for r in sweep:
        if "error" in r or r["rel_err_vs_torch"] > 1e-2:
            continue
        if r["H"] not in best or r["us"] < best[r["H"]]["us"]:
            best[r["H"]] = r
    return {h: r["_cfg"] for h, r in best.items()}


def run_decode(ws, ceil, heads_list, batches, seqs, with_torch, deadline, configs=None) -> list[dict]:
    rows = []
    free = torch.cuda.mem_get_info()[0]
    for seq in seqs:
        for bsz in batches:
            for heads in heads_list:
                if time.time() > deadline:
                    log("decode: out of time")
                    return rows
                qn, qp, kv, bt, sl, scale = ws.inputs(bsz, seq, heads, seed=seq + bsz + heads)
                row = {"H": heads, "B": bsz, "S": seq, "kv_bytes": kv_bytes(bsz, seq, LKV, R, 2),
                       "flops": flops(bsz, heads, seq, LKV, R)}
                st: dict = {}
                path, cfg = (configs or {}).get(heads, (auto_path(qn, kv, bt, sl, None), None))
                o, lse = SPLIT_KERNELS[path](qn, qp, kv, bt, sl, scale, config=cfg, stats=st)
                row["launch"] = {k: v for k, v in st.items() if k != "grid"}
                if cfg is None:  # the public entry point with its default path and launch shape
                    t = time_graph(lambda: mla_decode(qn, qp, kv, bt, sl, scale))
                else:
                    t = time_graph(lambda: SPLIT_KERNELS[path](qn, qp, kv, bt, sl, scale, config=cfg))
                row["kernel"] = figures(t, bsz, heads, seq, ceil)
                # torch needs the contiguous copy plus [B, H, S] scores in bf16 and float32 (x2)
                need = bsz * seq * (LKV + R) * 2 + bsz * heads * seq * 14
                if with_torch and need < 0.8 * free:
                    try:
                        kvc = kv[bt.long()].view(bsz, seq, LKV + R)
                        o_t, lse_t = torch_decode(qn, qp, kvc, scale)
                        row["rel_err_vs_torch"] = {"o": rel_err(o, o_t), "lse": rel_err(lse, lse_t)}
                        del o_t, lse_t
                        tt = time_graph(lambda: torch_decode(qn, qp, kvc, scale), replays=10)
                        row["torch"] = figures(tt, bsz, heads, seq, ceil)
                        row["speedup_vs_torch"] = tt / t
                        del kvc
                    except torch.cuda.OutOfMemoryError:
                        row["torch"] = "out of memory"
                else:
                    row["torch"] = "skipped (memory)" if with_torch else "skipped"
                torch.cuda.empty_cache()
                log("decode", json.dumps(row))
                rows.append(row)
    return rows


def run_combine(ceil) -> list[dict]:
    rows = []
    for bsz in (1, 32):
        for heads in (16, 128):
            for n in (2, 4, 8):
                o_parts = torch.randn(n, bsz, heads, LKV, device="cuda").to(DT)
                lse_parts = torch.randn(n, bsz, heads, device="cuda") * 3
                helix_combine(o_parts, lse_parts)
                t1 = time_graph(lambda: helix_combine(o_parts, lse_parts), replays=50)
                tb = time_graph_batched(lambda: helix_combine(o_parts, lse_parts))
                by = o_parts.numel() * 2 + lse_parts.numel() * 4 + bsz * heads * (LKV * 2 + 4)
                row = {"B": bsz, "h": heads, "N": n, "us_one_graph_replay": t1 * 1e6,
                       "us_per_call_in_graph": tb * 1e6, "bytes": by, "GBps": by / tb / 1e9}
                log("combine", json.dumps(row))
                rows.append(row)
    return rows


def environment() -> dict:
    """What every benchmark record names: the card and the software that ran on it (logged as well)."""
    import triton

    env = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    log(f"card {env['card']}, torch {env['torch']}, triton {env['triton']}")
    return env


def card_tag(name: str) -> str:
    for k in ("H200", "H100", "H800", "A100", "B200", "GB200", "L40S"):
        if k in name.upper():
            return k.lower()
    return "".join(ch for ch in name.lower() if ch.isalnum())[:20] or "gpu"


def markdown(res: dict) -> str:
    c = res["ceilings"]
    out = [f"# Kernel roofline: {res['card']}", "",
           f"torch {res['torch']}, triton {res['triton']}; read {c['read_GBps']:.0f} GB/s (best read-only stream: "
           f"{c['read_best']}), copy {c['copy_GBps']:.0f} GB/s (read + write), bf16 matmul {c['matmul_TFLOPs']:.0f} "
           "TFLOP/s, all measured in this run; floor = max(KV bytes / read, FLOPs / matmul). "
           f"Lkv {LKV}, R {R}, {TPB} tokens/block, shuffled block table, bf16; median of CUDA-graph replays.", "",
           "## mla_decode vs plain-torch absorbed decode (contiguous cache, gather not timed)", "",
           "Path and launch shape per H: " + (", ".join(f"H={h}: {c}" for h, c in res["table_configs"].items())
                                              + " (fastest of the sweep below)" if res.get("table_configs")
                                              else "mla_decode's defaults (" + ", ".join(
                                                  f"H={h}: {c}" for h, c in res["default_configs"].items()) + ")")
           + ".", "",
           "| H | B | S | KV MB | floor us (bytes / flops) | us | GB/s | TFLOP/s | x floor | %read | %matmul "
           "| torch us | torch GB/s | torch TFLOP/s | speedup | launch |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("decode", []):
        t = r["kernel"]
        tt = r["torch"] if isinstance(r["torch"], dict) else None
        la = r["launch"]
        launch = (f"cuda {'wgmma' if la.get('wgmma') else 'mma.sync'} s{la['num_stages']}/splits {la['splits']}"
                  if la.get("path") == "cuda" else
                  f"h{la['block_h']}/n{la['block_n']}/w{la['num_warps']}/s{la['num_stages']}/splits {la['splits']}"
                  + ("/tma" if la.get("tma") else ""))
        out.append(
            f"| {r['H']} | {r['B']} | {r['S'] // 1024}K | {r['kv_bytes'] / 1e6:.0f} | {t['floor_us']:.0f} "
            f"({t['floor_bytes_us']:.0f} / {t['floor_flops_us']:.0f}) | {t['us']:.1f} | {t['GBps']:.0f} | "
            f"{t['TFLOPs']:.1f} | {t['x_floor']:.2f} | {t['pct_read_bw']:.0f} | {t['pct_matmul']:.0f} | "
            + (f"{tt['us']:.1f} | {tt['GBps']:.0f} | {tt['TFLOPs']:.1f} | {r['speedup_vs_torch']:.2f}x"
               if tt else f"{r['torch']} | | | ") + f" | {launch} |")
    if res.get("sweep"):
        out += ["", "## launch-shape sweep (S = 1M, B = 1)", "",
                "| H | config (Triton h/n/warps/stages/programs per SM/tma, or cuda kernel stages/programs per SM) "
                "| us | x floor | GB/s | TFLOP/s | splits | regs | spills | smem | wgmma | rel err vs torch |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["sweep"]:
            if "error" in r:
                out.append(f"| {r['H']} | {r['config']} | {r['error']} | | | | | | | | | |")
            else:
                out.append(f"| {r['H']} | {r['config']} | {r['us']:.1f} | {r['x_floor']:.2f} | {r['GBps']:.0f} | "
                           f"{r['TFLOPs']:.1f} | {r.get('splits')} | {r.get('n_regs')} | {r.get('n_spills')} | "
                           f"{r.get('shared')} | {r.get('wgmma')} | {r['rel_err_vs_torch']:.2e} |")
    if res.get("combine"):
        out += ["", "## helix_combine (bf16 o, Lkv 512)", "",
                "| B | h | N | us (one graph replay) | us per call (20 in one graph) | GB/s |", "|---|---|---|---|---|---|"]
        for r in res["combine"]:
            out.append(f"| {r['B']} | {r['h']} | {r['N']} | {r['us_one_graph_replay']:.2f} | "
                       f"{r['us_per_call_in_graph']:.2f} | {r['GBps']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="golden/perf", help="output directory (default golden/perf)")
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 32, 128])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20])
    ap.add_argument("--sweep", action="store_true", help="also time several launch shapes at S=1M, B=1")
    ap.add_argument("--tuned", action="store_true", help="with --sweep: time the table with each H's fastest shape")
    ap.add_argument("--no-torch", action="store_true", help="skip the plain-torch baseline")
    ap.add_argument("--no-combine", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new measurements after this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    deadline = time.time() + args.budget_s
    res = {**environment(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
           "shape": {"Lkv": LKV, "R": R, "tokens_per_block": TPB, "dtype": "bfloat16"},
           "default_configs": {h: default_launch(h) for h in args.heads}}
    res["ceilings"] = measure_ceilings()
    log("ceilings", json.dumps(res["ceilings"]))
    max_tokens = max(b * s for b in args.batches for s in args.seqs)
    free = torch.cuda.mem_get_info()[0]
    max_tokens = min(max_tokens, int(0.45 * free) // ((LKV + R) * 2) // TPB * TPB)
    ws = Workspace(max_tokens)
    fits = [(b, s) for b in args.batches for s in args.seqs if b * s <= max_tokens]
    res["skipped_for_memory"] = [(b, s) for b in args.batches for s in args.seqs if b * s > max_tokens]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = card_tag(res["card"])

    def save():  # after every section, so a run stopped at its time limit still leaves its figures
        (out / f"kernels-{tag}.json").write_text(json.dumps(res, indent=1, default=str))
        (out / f"kernels-{tag}.md").write_text(markdown(res))

    configs = None
    if args.sweep:
        res["sweep"] = run_sweep(ws, res["ceilings"], args.heads, max(args.seqs), deadline)
        if args.tuned:
            configs = best_configs(res["sweep"])
            res["table_configs"] = {h: cfg_str(*pc) for h, pc in configs.items()}
            log("table configs", res["table_configs"])
        for r in res["sweep"]:
            r.pop("_cfg", None)
        save()
    res["decode"] = []
    for seq in args.seqs:
        bs = [b for b in args.batches if (b, seq) in fits]
        res["decode"] += run_decode(ws, res["ceilings"], args.heads, bs, [seq], not args.no_torch, deadline, configs)
        save()
    del ws
    torch.cuda.empty_cache()
    if not args.no_combine:
        res["combine"] = run_combine(res["ceilings"])
    save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.exit(main())
