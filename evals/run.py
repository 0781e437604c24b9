"""``helix eval``: the chosen tasks on the Helix deployment and on the single-device reference, compared.

Both runs use the same weights, the same lm-eval task definitions, few-shot examples, truncation and
generation settings; only the backend behind the ``helix`` lm-eval model differs. Per task the report holds
both scores, per-sample agreement, the paired score difference with its 95% interval and pass/fail, plus, for
a checkpoint with published figures in golden/accuracy/, the one-sided threshold test of DESIGN §7.

With no --model / --config it runs the embedded default: the tiny synthetic checkpoint (written on first
use), context 1 + Helix generation CP 2, 2 questions per MMLU subject and 20 GSM8K questions, 5-shot,
prompts cut to 1024 tokens and at most 32 generated tokens, and also checks the reference's predictions
against golden/accuracy/tiny-synthetic-reference.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import pickle
import tempfile
import time

from evals.backends import BACKENDS, BackendSpec
from evals.compare import (GOLDEN_DIR, TASK_METRICS, check_public_reference, compare_task, golden_mismatches,
                           public_references, samples_of)
from evals.task_data import TASKS, go_offline, resolve_data_dir, task_dir, task_manager

log = logging.getLogger("helix.eval")

EMBEDDED = {"limit": "mmlu=2,gsm8k=20", "max_length": 1024, "max_gen_toks": 32}
TINY_GOLDEN = os.path.join(GOLDEN_DIR, "tiny-synthetic-reference.json")


def parse_limit(text: str | None, tasks: list[str]) -> dict[str, int | None]:
    """``N`` (every task) or ``task=N,task=N``."""
    if not text:
        return {t: None for t in tasks}
    if "=" not in text:
        return {t: int(text) for t in tasks}
    pairs = dict(item.split("=", 1) for item in text.split(","))
    if unknown := sorted(set(pairs) - set(TASKS)):
        raise ValueError(f"--limit: unknown task(s) {unknown}; tasks are {list(TASKS)}")
    return {t: int(pairs[t]) if t in pairs else None for t in tasks}


def evaluate(spec: BackendSpec, tasks: list[str], limits: dict, args: argparse.Namespace, tm) -> dict:
    """lm-eval on one backend: ``{task: {"results": ..., "samples": {key: record}}}``."""
    import lm_eval

    from evals.lm_eval_adapter import HelixLM

    model_args = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
    model_args["pretrained"] = model_args.pop("model", None)
    model_args.update(batch_size=args.batch_size, max_length=args.max_length, max_gen_toks=args.max_gen_toks or 256)
    lm = HelixLM.from_model_args({k: v for k, v in model_args.items() if v is not None})
    out = {}
    try:
        for task in tasks:
            log.info("%s backend: %s (limit %s)", spec.backend, task, limits[task])
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=tm, num_fewshot=args.num_fewshot, limit=limits[task],
                gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None,
                log_samples=True, bootstrap_iters=0)
            out[task] = {"results": {m: res["results"][task][m] for m in TASK_METRICS[task]},
                         "samples": samples_of(task, res)}
    finally:
        lm.engine.shutdown()
    return out


def _evaluate_to_file(spec: BackendSpec, tasks: list[str], limits: dict, args: argparse.Namespace, task_path: str,
                      out_file: str, log_level: int) -> None:
    """Entry point of the process that runs one backend beside the other (see ``evaluate_both``)."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    run = evaluate(spec, tasks, limits, args, task_manager(task_path))
    with open(out_file, "wb") as f:
        pickle.dump(run, f)


def evaluate_both(deployed: BackendSpec, reference: BackendSpec, tasks: list[str], limits: dict,
                  args: argparse.Namespace, task_path: str) -> dict:
    """``{"deployed": run, "reference": run}``. By default one after the other, so the reference can use the
    deployment's first device once the deployment has exited; with ``--reference-device`` the reference runs
    there, in its own process, at the same time as the deployment (on a GPU the deployment does not use)."""
    if not args.reference_device:
        tm = task_manager(task_path)
        return {"deployed": evaluate(deployed, tasks, limits, args, tm),
                "reference": evaluate(reference, tasks, limits, args, tm)}
    with tempfile.TemporaryDirectory(prefix="helix-eval-reference-") as tmp:
        out_file = os.path.join(tmp, "run.pkl")
        child = multiprocessing.get_context("spawn").Process(
            target=_evaluate_to_file, name="helix-eval-reference",
            args=(dataclasses.replace(reference, device=args.reference_device), tasks, limits, args, task_path,
                  out_file, logging.getLogger().getEffectiveLevel()))
        child.start()
        try:
            deployed_run = evaluate(deployed, tasks, limits, args, task_manager(task_path))
            child.join()
        finally:
            if child.is_alive():  # the deployment failed (or was interrupted): do not leave the reference running
                child.terminate()
                child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the reference run on {args.reference_device} failed (exit code {child.exitcode}); "
                               "its traceback is printed above")
        with open(out_file, "rb") as f:
            return {"deployed": deployed_run, "reference": pickle.load(f)}


def report_markdown(report: dict) -> str:
    lines = [f"# helix eval: {report['deployed_backend']} vs reference", "",
             f"model `{report['model']}`, dtype {report['dtype']}, cp {report['cp']}, "
             f"tokens_per_block {report['tokens_per_block']}, {report['seconds']:.0f} s", "",
             "| task | metric | n | deployed | reference | diff [95% CI] | agreement | threshold | pass |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for task, c in report["comparison"].items():
        for m, v in c["metrics"].items():
            lines.append(f"| {task} | {m} | {c['n']} | {v['deployed']:.2f} | {v['reference']:.2f} | "
                         f"{v['diff']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] | {100 * c['agreement']:.1f}% | "
                         f"{v['threshold_test']['threshold']:.2f} | {'PASS' if c['passed'] else 'FAIL'} |")
    for side, checks in report["public_references"].items():
        for c in checks:
            lines.append(f"\n{side} vs {c['model']} {c['metrics']} ({c['source'].split(' ')[0]}): score "
                         f"{c['score']:.2f}, {'threshold %.2f' % c['threshold'] if 'threshold' in c else 'floor %.2f' % c['floor']}"
                         f" -> {'PASS' if c['passed'] else 'FAIL'}{'; ' + c['note'] if 'note' in c else ''}")
    if "golden_outputs" in report:
        g = report["golden_outputs"]
        lines.append(f"\nreference vs golden outputs: {g['mismatches']} mismatches of {g['checked']} samples")
    lines.append(f"\n**overall: {'PASS' if report['passed'] else 'FAIL'}**")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    from helix.checkpoint import DEFAULT_PRESET, ensure_checkpoint

    embedded = args.model is None and args.config is None
    for key, value in EMBEDDED.items():
        if getattr(args, key) is None and embedded:
            setattr(args, key, value)
    tasks = [t.strip() for t in args.tasks.split(",")]
    if unknown := sorted(set(tasks) - set(TASKS)):
        raise ValueError(f"--tasks: unknown {unknown}; choose from {list(TASKS)}")
    limits = parse_limit(args.limit, tasks)
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is not None:
        go_offline()
    model = args.model or (None if args.config else ensure_checkpoint(DEFAULT_PRESET))
    deployed = BackendSpec(backend=args.backend, model=model, config=args.config, cp=args.cp,
                           tokens_per_block=args.tokens_per_block, dtype=args.dtype, device=args.device)
    reference = dataclasses.replace(deployed, backend="reference")
    min_agreement = args.min_agreement
    if min_agreement is None and args.dtype in ("float32", "float64"):
        min_agreement = 1.0  # DESIGN §6: in float32 the deployment must reproduce the oracle's predictions

    start = time.time()
    with task_dir(data_dir) as path:
        runs = evaluate_both(deployed, reference, tasks, limits, args, path)
    report = {"deployed_backend": deployed.backend, "model": deployed.model_dir(), "dtype": args.dtype,
              "cp": args.cp, "tokens_per_block": args.tokens_per_block, "tasks": tasks, "limits": limits,
              "num_fewshot": args.num_fewshot, "max_length": args.max_length, "max_gen_toks": args.max_gen_toks,
              "data": data_dir or "huggingface hub",
              "reference_device": args.reference_device or deployed.device, "seconds": time.time() - start,
              "comparison": {t: compare_task(t, runs["deployed"][t]["samples"], runs["reference"][t]["samples"],
                                             min_agreement) for t in tasks},
              "public_references": {}}
    name = args.golden or os.path.basename(os.path.normpath(deployed.model_dir()))
    for side, result in runs.items():
        checks = [check_public_reference(e, {m: 100 * v for m, v in result[e["task"]]["results"].items()},
                                         report["comparison"][e["task"]]["n"])
                  for e in public_references(name) if e["task"] in tasks]
        if checks:
            report["public_references"][side] = checks
    passed = all(c["passed"] for c in report["comparison"].values())
    passed = passed and all(c["passed"] for cs in report["public_references"].values() for c in cs)
    if embedded and os.path.exists(TINY_GOLDEN) and not args.write_golden:
        with open(TINY_GOLDEN) as f:
            golden = json.load(f)["samples"]
        bad = [k for t in tasks for k in golden_mismatches(t, runs["reference"][t]["samples"], golden[t])]
        report["golden_outputs"] = {"file": TINY_GOLDEN, "checked": sum(len(runs["reference"][t]["samples"]) for t in tasks),
                                    "mismatches": len(bad), "first": bad[:20]}
        passed = passed and not bad
    report["passed"] = passed
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump({side: {t: r["samples"] for t, r in result.items()} for side, result in runs.items()}, f)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report_markdown(report))
    if args.write_golden:
        with open(args.write_golden, "w") as f:
            json.dump({"kind": "outputs", "checkpoint": "helix make-checkpoint --preset deepseek-v3-lite-tiny "
                       "(seed 0, bfloat16 weights), reference backend in " + args.dtype,
                       "settings": {k: report[k] for k in ("tasks", "limits", "num_fewshot", "max_length", "max_gen_toks")},
                       "samples": {t: runs["reference"][t]["samples"] for t in tasks}}, f, indent=1)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="mmlu,gsm8k", help="comma-separated, from: " + ", ".join(TASKS))
    p.add_argument("--limit", help="questions per task (per MMLU subject): N, or task=N,task=N "
                                   f"(embedded default {EMBEDDED['limit']}; otherwise all)")
    p.add_argument("--num-fewshot", type=int, default=5)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF checkpoint directory (default: the embedded tiny synthetic checkpoint)")
    src.add_argument("--config", help="deployment file (YAML or JSON) with model / context_servers / generation_servers")
    p.add_argument("--cp", type=int, default=2, help="Helix generation context_parallel_size (with --model)")
    p.add_argument("--tokens-per-block", type=int, default=32)
    p.add_argument("--backend", choices=BACKENDS, default="helix",
                   help="what is compared against the reference (reference: the pipeline checking itself)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference-device",
                   help="run the reference on this device (e.g. cuda:3, a GPU the deployment leaves free) at the same "
                        "time as the deployment, in its own process (default: on --device, after the deployment)")
    p.add_argument("--data-dir", help="local mmlu/ and gsm8k/ data (default $HELIX_EVAL_DATA, else the HF hub)")
    p.add_argument("--out", default=os.path.join("runs", "eval"), help="output directory (results.json, report.md, samples.json)")
    p.add_argument("--max-length", type=int, help="tokens the model sees; longer prompts are cut from the left "
                                                  f"(embedded default {EMBEDDED['max_length']}; otherwise the checkpoint's)")
    p.add_argument("--max-gen-toks", type=int, help=f"generation cap (embedded default {EMBEDDED['max_gen_toks']}; "
                                                    "otherwise the task's)")
    p.add_argument("--batch-size", type=int, default=64, help="requests per backend call")
    p.add_argument("--min-agreement", type=float,
                   help="fail a task below this per-sample agreement (default 1.0 in float32/float64, none in bf16)")
    p.add_argument("--golden", help="published reference to test against, e.g. deepseek-ai/DeepSeek-V3-Lite "
                                    "(default: matched by the checkpoint directory's name)")
    p.add_argument("--write-golden", help=argparse.SUPPRESS)  # regenerates golden/accuracy/tiny-synthetic-reference.json


def main(args: argparse.Namespace) -> None:
    """Runs, prints the markdown report, and exits with status 2 when any check failed."""
    report = run(args)
    print(report_markdown(report))
    print(f"wrote {os.path.join(args.out, 'results.json')} and report.md")
    if not report["passed"]:
        raise SystemExit(2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parser.parse_args())
