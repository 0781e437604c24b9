"""Micro-benchmark of the routed-expert decode FFN (docs/design.md §8.3): ``python -m kernels.bench_moe [--out DIR]``.

Shape of deepseek-v3-lite: I 1536, D 2560, k 6 of 72 experts, bf16. Two placements:

* ``single``: one GPU holds all 72 experts, every choice is local;
* ``ep4``: rank 0 of 4 expert-parallel ranks holds 18 experts, so ~1/4 of the choices are local.

For T in {1, 8} tokens it times, as CUDA-graph replays between CUDA events (median),

* ``moe_decode`` (the Triton kernels; also a few launch shapes),
* ``gather``: the former graph path of helix/moe.py, ``w[idx]`` copies of every (token, choice) slot's
  expert (other ranks' choices use expert 0 with weight 0) and three bmm,
* ``dense``: every local expert over all T tokens (F.linear), scaled by that expert's routing weight per
  token (0 where not chosen),

and reports the weight bytes a call must read (distinct local experts chosen x 3*I*D*2) and the achieved
GB/s against them. Each graph replays CALLS calls with different routings (and the weights total
several times L2), so one call's experts are mostly not left in L2 by the one before. Writes
moe-<card>.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.bench import card_tag, environment, log, measure_ceilings, time_graph
from kernels.moe_decode import MoEConfig, default_config, moe_decode_torch, moe_decode_triton, weight_bytes

I, D, K, N_EXPERTS = 1536, 2560, 6, 72
DT = torch.bfloat16
CALLS = 8  # routings per captured graph
PLACEMENTS = {"single": N_EXPERTS, "ep4": N_EXPERTS // 4}
SWEEP = [MoEConfig(), MoEConfig(8, 256, 4, 8, 256, 4), MoEConfig(4, 512, 4, 4, 512, 4),
         MoEConfig(8, 512, 8, 8, 512, 8), MoEConfig(32, 256, 8, 32, 256, 8), MoEConfig(16, 512, 8, 16, 512, 8)]


def cfg_str(c: MoEConfig) -> str:
    return f"up {c.block_i}x{c.block_d}/w{c.warps_1}, down {c.block_n}x{c.block_k}/w{c.warps_2}"


def gather(x, wg, wu, wd, ids, weights):
    """The former CUDA-graph path of helix/moe.py (MoE._gathered)."""
    tokens, k = ids.shape
    mine = (ids >= 0) & (ids < wg.shape[0])
    idx = torch.where(mine, ids, 0).flatten()
    w = torch.where(mine, weights, 0.0).flatten().to(x.dtype)
    xs = x.repeat_interleave(k, dim=0)[:, :, None]
    h = F.silu(torch.bmm(wg[idx], xs)) * torch.bmm(wu[idx], xs)
    return (torch.bmm(wd[idx], h)[:, :, 0] * w[:, None]).view(tokens, k, -1).sum(1)


def dense(x, wg, wu, wd, ids, weights):
    """Every local expert over every token; per-token coefficient = its routing weight, 0 if not chosen."""
    experts = wg.shape[0]
    coef = ((ids[:, :, None] == torch.arange(experts, device=ids.device)) * weights[:, :, None]).sum(1)  # [T, E_r]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts):
        h = F.silu(F.linear(x, wg[e])) * F.linear(x, wu[e])
        y += F.linear(h, wd[e]).float() * coef[:, e:e + 1]
    return y.to(x.dtype)


def routings(tokens: int, calls: int, seed: int):
    """``calls`` random top-k routings over all 72 experts: ids [T, k] (global = rank 0's local ids),
    float32 weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(calls):
        ids = torch.stack([torch.randperm(N_EXPERTS, device="cuda", generator=g)[:K] for _ in range(tokens)])
        out.append((ids, torch.rand(tokens, K, device="cuda", generator=g)))
    return out


def time_calls(fn, x, w, routes) -> float:
    """Median seconds per call: one graph holds one call per routing."""
    def all_calls():
        for ids, wts in routes:
            fn(x, *w, ids, wts)
    return time_graph(all_calls, replays=15) / len(routes)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(ceil, deadline) -> tuple[list[dict], list[dict]]:
    rows, sweep = [], []
    g = torch.Generator(device="cuda").manual_seed(0)
    full = [torch.randn(N_EXPERTS, *shape, device="cuda", generator=g).mul_(shape[1] ** -0.5).to(DT)
            for shape in ((I, D), (I, D), (D, I))]
    for place, experts in PLACEMENTS.items():
        w = [t[:experts].contiguous() for t in full]
        for tokens in (1, 8):
            if time.time() > deadline:
                log("out of time")
                return rows, sweep
            x = torch.randn(tokens, D, device="cuda", generator=g).to(DT)
            routes = routings(tokens, CALLS, seed=tokens + experts)
            need = statistics.mean(weight_bytes(ids, experts, I, D, 2) for ids, _ in routes)
            local = statistics.mean(float(((ids >= 0) & (ids < experts)).float().mean()) for ids, _ in routes)
            ref = moe_decode_torch(x, *w, *routes[0])
            row = {"placement": place, "E_r": experts, "T": tokens, "local_fraction": local,
                   "weight_MB_needed": need / 1e6,
                   "rel_err_vs_torch_ref": {"moe_decode": rel_err(moe_decode_triton(x, *w, *routes[0]), ref),
                                            "gather": rel_err(gather(x, *w, *routes[0]), ref),
                                            "dense": rel_err(dense(x, *w, *routes[0]), ref)}}
            for name, fn in (("moe_decode", moe_decode_triton), ("gather", gather), ("dense", dense)):
                t = time_calls(fn, x, w, routes)
                row[name] = {"us": t * 1e6, "GBps": need / t / 1e9, "pct_read_bw": 100 * need / t / 1e9 / ceil["read_GBps"]}
            row["speedup_vs_gather"] = row["gather"]["us"] / row["moe_decode"]["us"]
            row["speedup_vs_dense"] = row["dense"]["us"] / row["moe_decode"]["us"]
            log("moe", json.dumps(row))
            rows.append(row)
            for cfg in SWEEP:
                fn = (lambda c: lambda *a: moe_decode_triton(*a, config=c))(cfg)
                t = time_calls(fn, x, w, routes)
                sweep.append({"placement": place, "T": tokens, "config": cfg_str(cfg), "us": t * 1e6,
                              "GBps": need / t / 1e9})
                log("sweep", json.dumps(sweep[-1]))
            torch.cuda.empty_cache()
    return rows, sweep


def markdown(res: dict) -> str:
    c = res["ceilings"]
    out = [f"# MoE decode (routed experts): {res['card']}", "",
           f"torch {res['torch']}, triton {res['triton']}; read {c['read_GBps']:.0f} GB/s (best read-only stream) "
           f"measured in this run. I {I}, D {D}, k {K} of {N_EXPERTS} experts, bf16; median of CUDA-graph replays, {CALLS} "
           f"calls with different routings per graph. GB/s = weight bytes needed (distinct local experts chosen "
           f"x 3*I*D*2) / time. moe_decode launch shape: {res['default_config']}. %read compares with "
           f"that read bandwidth; T = 8 can pass 100%: choices that repeat an expert read it again (mostly from "
           f"L2) but its bytes count once.", "",
           "| placement | E_r | T | local choices | MB needed | moe_decode us | GB/s | %read | gather us | GB/s "
           "| dense us | GB/s | x vs gather | x vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        m, ga, de = r["moe_decode"], r["gather"], r["dense"]
        out.append(f"| {r['placement']} | {r['E_r']} | {r['T']} | {r['local_fraction']:.2f} | "
                   f"{r['weight_MB_needed']:.0f} | {m['us']:.1f} | {m['GBps']:.0f} | {m['pct_read_bw']:.0f} | "
                   f"{ga['us']:.1f} | {ga['GBps']:.0f} | {de['us']:.1f} | {de['GBps']:.0f} | "
                   f"{r['speedup_vs_gather']:.1f}x | {r['speedup_vs_dense']:.1f}x |")
    out += ["", "Relative error vs the float32 torch reference (first routing): "
            + "; ".join(f"{r['placement']} T={r['T']}: " + ", ".join(f"{k} {v:.1e}" for k, v in r['rel_err_vs_torch_ref'].items())
                        for r in res["rows"]), ""]
    if res.get("sweep"):
        out += ["## moe_decode launch shapes", "", "| placement | T | config | us | GB/s |", "|---|---|---|---|---|"]
        out += [f"| {s['placement']} | {s['T']} | {s['config']} | {s['us']:.1f} | {s['GBps']:.0f} |" for s in res["sweep"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="golden/perf", help="output directory (default golden/perf)")
    ap.add_argument("--budget-s", type=float, default=150, help="stop starting new measurements after this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench_moe needs a CUDA GPU", file=sys.stderr)
        return 2
    deadline = time.time() + args.budget_s
    res = {**environment(), "shape": {"I": I, "D": D, "k": K, "experts": N_EXPERTS, "dtype": "bfloat16"},
           "default_config": cfg_str(default_config(False)), "ceilings": measure_ceilings()}
    log("ceilings", json.dumps(res["ceilings"]))
    res["rows"], res["sweep"] = run(res["ceilings"], deadline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = card_tag(res["card"])
    (out / f"moe-{tag}.json").write_text(json.dumps(res, indent=1))
    (out / f"moe-{tag}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
