"""Expected decode latency at more GPUs than were measured, from a measured `helix bench` result.

A projection, not a measurement. For each Helix (or TP-attention) point measured at N and N/2 GPUs:

    weights per rank  w(N) = replicated + sharded / N       (solved from the N/2 and N rows)
    KV per rank       Helix: kv(N) / 2 per doubling;  TP attention: unchanged (whole cache on every GPU)
    memory time       (kv + w) / measured read bandwidth (the floor's rate, kernels.bench.floor_s)
    collectives       same count per step; each collective's latency grows by the factor measured
                      from N/2 to N
    the rest          measured time - memory time - collectives at N (kernel inefficiency, skew between
                      ranks), carried over unchanged

    python -m helix.projection golden/perf/h100-x4.json 8   ->  golden/perf/h100-x8-projected.{json,md}
"""

from __future__ import annotations

import json
import os
import sys


def project(result: dict, target: int) -> list[dict]:
    rows = result["rows"]
    if "read_GBps" not in result["ceilings"]:
        raise ValueError("projection: the result has no measured read bandwidth (ceilings.read_GBps); it predates "
                         "read-bandwidth floors: rerun `helix bench` to get one")
    bw = result["ceilings"]["read_GBps"] * 1e9
    by_key = {(r["mode"], r["gpus"], r["batch"], r["context"]): r for r in rows}
    out = []
    for (mode, n, batch, context), r in sorted(by_key.items()):
        half = by_key.get((mode, n // 2, batch, context))
        if mode not in ("helix", "tp") or half is None or target != 2 * n:
            continue
        sharded = n * (half["weight_bytes"] - r["weight_bytes"])  # w(N/2) - w(N) = sharded / N
        replicated = r["weight_bytes"] - sharded / n
        w = replicated + sharded / target
        kv = r["kv_bytes"] / 2 if mode == "helix" else r["kv_bytes"]
        parts, half_parts = r["floor_parts"], half["floor_parts"]
        growth = {k: parts[k] / half_parts[k] for k in ("all_to_all_us", "all_reduce_us") if half_parts[k] > 0}
        coll = parts["collectives_ms"] * (growth.get("all_reduce_us", 1.0) if mode == "tp" else
                                          (growth.get("all_reduce_us", 1.0) + growth.get("all_to_all_us", 1.0)) / 2)
        mem = (kv + w) / bw * 1e3
        rest = r["ms"] - parts["memory_ms"] - parts["collectives_ms"]
        flops = r["attn_flops"] / (2 if mode == "helix" else 1)
        floor = max(mem, flops / (result["ceilings"]["matmul_TFLOPs"] * 1e12) * 1e3) + coll
        out.append({"mode": mode, "gpus": target, "batch": batch, "context": context, "projected_ms": mem + coll + rest,
                    "floor_ms": floor, "kv_bytes": kv, "weight_bytes": w, "from_measured_ms": r["ms"], "from_gpus": n})
    return out


def markdown(result: dict, rows: list[dict]) -> str:
    lines = [f"# Projected (not measured): {result['card']} x{rows[0]['gpus'] if rows else '?'}, {result['preset']} "
             f"({result['layers']} layers)", "",
             "From the measured x4 run by `python -m helix.projection` (model in its docstring).", "",
             "| config | B | context | projected ms | floor ms | measured ms at N/2 |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = "Helix" if r["mode"] == "helix" else "TP-attn"
        lines.append(f"| {name} N={r['gpus']} | {r['batch']} | {r['context'] // 1024}K | {r['projected_ms']:.3f} | "
                     f"{r['floor_ms']:.3f} | {r['from_measured_ms']:.3f} (N={r['from_gpus']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, target = argv[0], int(argv[1])
    with open(path) as f:
        result = json.load(f)
    rows = project(result, target)
    base = os.path.join(os.path.dirname(path), f"{os.path.basename(path).split('-x')[0]}-x{target}-projected")
    with open(base + ".json", "w") as f:
        json.dump({"source": os.path.basename(path), "card": result["card"], "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(result, rows))
    print(markdown(result, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
