"""``helix eval``: the chosen tasks on the Helix deployment and on the single-device reference, compared; or
(``--deployed URL``) on any OpenAI-compatible completions server against another (``--reference URL``) or
against the local reference (``--reference-model DIR``).

Both runs use the same weights, the same lm-eval task definitions, few-shot examples, truncation and
generation settings; only the backend behind the ``helix`` lm-eval model differs. Per task the report holds
both scores, per-sample agreement, the paired score difference with its 95% interval and pass/fail, plus, for
a checkpoint with published figures in golden/accuracy/, the one-sided threshold test of docs/design.md §7.3. Needle
tasks (RULER's niah_*, the project's niah_restated) also get a table and a heatmap per side by context length
and needle depth.

With no --model / --config it runs the embedded default, two runs of the same machinery: the tiny synthetic
checkpoint (written on first use) with 2 questions per MMLU subject and 20 GSM8K questions, 5-shot, prompts cut
to 1024 tokens and at most 32 generated tokens, its reference also checked against
golden/accuracy/tiny-synthetic-reference.json; then niah_restated on the deepseek-v3-needle checkpoint (an
induction circuit that solves it: 100% at every length and depth) at 2048 and 8192 tokens, depths
0,25,50,75,100. Both through context 1 + Helix generation CP 2, in one report.

The console shows one progress bar per backend and task, then the report; lm-eval's own output (its log lines,
warnings and progress bars) goes to eval.log in --out, or with -v to the console.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, TextIO

from evals.backends import BackendSpec
from evals.compare import (GOLDEN_DIR, check_public_reference, compare_task, golden_mismatches, public_references,
                           samples_of)
from evals.needle_report import SIDES, cells_markdown, needle_cells, write_heatmap
from evals.niah_restated import DEFAULT_DEPTHS
from evals.task_data import (DATA_TASKS, NEEDLE_TASKS, TASKS, generation_cap, go_offline, resolve_data_dir,
                             ruler_offline, task_dir, task_manager)
from helix.checkpoint import DEFAULT_PRESET, ensure_checkpoint
from helix.config import ConfigError
from helix.needle import PRESET as NEEDLE_PRESET
from helix.reference import ATTENTION
from helix.sources import is_synthetic, synthetic_config
from helix.tokenizer import write_byte_tokenizer
from helix.workers import children_ignore_ctrl_c

log = logging.getLogger("helix.eval")

TINY_GOLDEN = os.path.join(GOLDEN_DIR, "tiny-synthetic-reference.json")
KV_NAMES = {"auto": "in the model's dtype", "fp8": "fp8 (e4m3, a scale per row; the reference's unquantized)"}
LOG_FILE = "eval.log"  # in --out: lm-eval's log, warnings and progress bars, unless --verbose
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Embedded:
    """One run of the embedded default: a synthetic checkpoint, the task family it runs (``--tasks`` picks among
    them; ``tasks`` by default) and the values of the flags the command line leaves unset."""

    preset: str
    family: tuple[str, ...]
    tasks: tuple[str, ...]
    settings: dict
    golden: str | None = None  # golden outputs its reference must reproduce


EMBEDDED = (Embedded(DEFAULT_PRESET, DATA_TASKS, DATA_TASKS,
                     {"limit": "mmlu=2,gsm8k=20", "max_length": 1024, "max_gen_toks": 32}, TINY_GOLDEN),
            Embedded(NEEDLE_PRESET, NEEDLE_TASKS, ("niah_restated",), {"context_lengths": "2048,8192"}))


@dataclass(frozen=True)
class Needles:
    """The needle tasks' settings; their generators read them as lm-eval task metadata, one length at a time."""

    context_lengths: tuple[int, ...]
    depths: tuple[int, ...]
    samples_per_depth: int
    tokenizer: str  # what the generators count tokens with (AutoTokenizer.from_pretrained)

    def metadata(self, length: int) -> dict:
        return {"max_seq_lengths": [length], "depths": list(self.depths), "samples_per_depth": self.samples_per_depth,
                "tokenizer": self.tokenizer}


@dataclass(frozen=True)
class Run:
    """One model and the tasks run on it: deployed and reference evaluated, then compared."""

    deployed: BackendSpec
    reference: BackendSpec
    tasks: tuple[str, ...]
    limits: dict
    num_fewshot: int
    max_length: int  # tokens the adapter lets in; also the deployment's KV capacity
    max_gen_toks: int | None  # None: each task's own
    needles: Needles | None = None
    golden: str | None = None
    apply_chat_template: bool = False  # prompts rendered by the tokenizer's chat template (lm-eval's flag)
    fewshot_as_multiturn: bool = False  # few-shot examples as user/assistant turns (with the chat template only)

    def settings(self) -> dict:
        return {"model": self.deployed.name(), "reference": self.reference.name(), "tasks": list(self.tasks),
                "limits": self.limits,
                "num_fewshot": self.num_fewshot, "max_length": self.max_length, "max_gen_toks": self.max_gen_toks,
                "apply_chat_template": self.apply_chat_template, "fewshot_as_multiturn": self.fewshot_as_multiturn,
                **({k: v for k, v in dataclasses.asdict(self.needles).items() if k != "tokenizer"}
                   if self.needles else {})}


# --------------------------------------------------------------------------------------------- planning


def parse_limit(text: str | None, tasks: list[str]) -> dict[str, int | None]:
    """``N`` (every task; per context length for a needle task) or ``task=N,task=N``; each N >= 1."""
    if not text:
        return {t: None for t in tasks}
    if "=" not in text:
        return dict.fromkeys(tasks, _limit_count(text, text))
    pairs = dict(item.partition("=")[::2] for item in text.split(","))
    if unknown := sorted(set(pairs) - set(TASKS)):
        raise ConfigError(f"--limit={text!r}: unknown task(s) {unknown}; tasks are {list(TASKS)}")
    counts = {task: _limit_count(text, count) for task, count in pairs.items()}
    return {t: counts.get(t) for t in tasks}


def _limit_count(text: str, count: str) -> int:
    if not count.strip().isdigit() or int(count) < 1:
        raise ConfigError(f"--limit={text!r}: {count!r} is not a count; give N or task=N,task=N with integers N >= 1")
    return int(count)


def parse_ints(flag: str, text: str, low: int, high: int | None = None) -> tuple[int, ...]:
    """A comma-separated list of integers in [low, high]."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{flag}={text!r}: must be comma-separated integers") from None
    for v in values:
        if v < low or (high is not None and v > high):
            raise ConfigError(f"{flag}={v}: must be " + (f">= {low}" if high is None else f"in [{low}, {high}]"))
    return values


def tokenizer_source(model: str, scratch: str) -> str:
    """What RULER's generators load with AutoTokenizer: the checkpoint directory; for synthetic weights (no
    directory) their byte tokenizer, written into ``scratch``."""
    if not is_synthetic(model):
        return model
    out = tempfile.mkdtemp(prefix="tokenizer-", dir=scratch)
    write_byte_tokenizer(out, synthetic_config(model).max_position_embeddings)
    return out


def plan_run(args: argparse.Namespace, deployed: BackendSpec, tasks: tuple[str, ...], settings: dict,
             scratch: str, golden: str | None = None, reference: BackendSpec | None = None) -> Run:
    """The run of ``tasks`` on ``deployed`` against ``reference`` (default: the reference backend on the same
    weights): a flag given on the command line wins, else ``settings``. Needle lengths are checked against the
    model; the adapter's max_length (and so the KV capacity) is --max-length, else the largest length plus the
    generation cap, else the model's limit or the smaller capacity of a deployment file or endpoint (which the
    adapter holds every max_length to)."""
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS

    def value(key: str):
        return getattr(args, key) if getattr(args, key) is not None else settings.get(key)

    if args.samples_per_depth < 1:
        raise ConfigError(f"--samples-per-depth={args.samples_per_depth}: must be >= 1")
    reference = reference or dataclasses.replace(deployed, backend="reference")
    max_position = deployed.max_position()
    capacities = [c for c in (deployed.capacity(), reference.capacity()) if c is not None]
    needles, longest = None, min([max_position] + capacities)
    if needle_tasks := [t for t in tasks if t in NEEDLE_TASKS]:
        lengths = parse_ints("--context-lengths", value("context_lengths") or ",".join(map(str, DEFAULT_SEQ_LENGTHS)), 1)
        for length in lengths:
            if length > max_position:
                raise ConfigError(f"--context-lengths={length}: must be <= max_position_embeddings={max_position} of "
                                  f"{deployed.name()} (a needle prompt and its generated tokens fit in each length)")
        needles = Needles(lengths, parse_ints("--depths", args.depths, 0, 100), args.samples_per_depth,
                          tokenizer_source(deployed.tokenizer_dir(), scratch))
        generated = value("max_gen_toks") or max(generation_cap(t) for t in needle_tasks)
        longest = min(max(lengths) + generated, max_position)
    multiturn = args.apply_chat_template if args.fewshot_as_multiturn is None else args.fewshot_as_multiturn
    if multiturn and not args.apply_chat_template:
        raise ConfigError("--fewshot-as-multiturn: few-shot examples become chat turns only with --apply-chat-template")
    return Run(deployed, reference, tasks, parse_limit(value("limit"), list(tasks)), args.num_fewshot,
               value("max_length") or longest, value("max_gen_toks"), needles,
               None if args.apply_chat_template else golden,  # the golden outputs are of unformatted prompts
               args.apply_chat_template, multiturn)


def endpoints(args: argparse.Namespace) -> tuple[BackendSpec, BackendSpec]:
    """--deployed URL against --reference URL or the local reference on --reference-model DIR; the tokenizer lm-eval
    measures and cuts prompts with is --tokenizer, else the reference model's."""
    if (args.reference is None) == (args.reference_model is None):
        raise ConfigError(f"--deployed={args.deployed!r}: give exactly one of --reference URL (another endpoint) and "
                          "--reference-model DIR (the single-device reference on that checkpoint)")
    tokenizer = args.tokenizer or args.reference_model
    if tokenizer is None:
        raise ConfigError(f"--reference={args.reference!r}: needs --tokenizer DIR (the served model's tokenizer, "
                          "which lm-eval measures and cuts prompts with)")
    if args.reference is not None and args.reference_device:
        raise ConfigError(f"--reference-device={args.reference_device!r}: only for the local reference "
                          "(--reference-model), not an endpoint")
    deployed = BackendSpec(backend="endpoint", url=args.deployed, tokenizer=tokenizer)
    if args.reference is not None:
        return deployed, BackendSpec(backend="endpoint", url=args.reference, tokenizer=tokenizer)
    return deployed, BackendSpec(backend="reference", model=args.reference_model, dtype=args.dtype,
                                 device=args.device, attention=args.reference_attention)


def plan(args: argparse.Namespace, scratch: str) -> list[Run]:
    """One run on --model / --config, or the embedded default's runs (those with a task asked)."""
    asked = None if args.tasks is None else tuple(dict.fromkeys(t.strip() for t in args.tasks.split(",")))
    if asked is not None and (unknown := sorted(set(asked) - set(TASKS))):
        raise ConfigError(f"--tasks={args.tasks!r}: unknown {unknown}; choose from {list(TASKS)}")
    common = dict(backend=args.backend, cp=args.cp, tokens_per_block=args.tokens_per_block, dtype=args.dtype,
                  device=args.device, colocate=args.colocate, attention=args.reference_attention,
                  kv_dtype=args.kv_dtype)
    if args.config is not None and args.kv_dtype != "auto":
        raise ConfigError(f"--kv-dtype={args.kv_dtype!r}: with --config the deployment file sets "
                          "generation_servers.kv_cache_config.dtype")
    if args.deployed is not None:
        deployed, reference = endpoints(args)
        return [plan_run(args, deployed, asked or DATA_TASKS, {}, scratch, reference=reference)]
    if given := [f for f in ("reference", "reference_model", "tokenizer") if getattr(args, f) is not None]:
        raise ConfigError(f"--{given[0].replace('_', '-')}={getattr(args, given[0])!r}: only with --deployed URL")
    if args.model is not None or args.config is not None:
        spec = BackendSpec(model=args.model, config=args.config, **common)
        return [plan_run(args, spec, asked or DATA_TASKS, {}, scratch)]
    runs = []
    for e in EMBEDDED:
        tasks = e.tasks if asked is None else tuple(t for t in asked if t in e.family)
        if tasks:
            spec = BackendSpec(model=ensure_checkpoint(e.preset), **common)
            runs.append(plan_run(args, spec, tasks, e.settings, scratch, e.golden))
    return runs


# --------------------------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def console_output(log_path: str | None) -> Iterator[TextIO]:
    """Yields the console's stream, for the progress bars. With ``log_path``, every log record, Python warning
    and write to sys.stderr goes there instead (lm-eval logs each task it builds, warns about each few-shot
    setting and draws progress bars of its own, per MMLU subject); helix's own warnings and every error also
    reach the console. Without, nothing changes (--verbose)."""
    console = sys.stderr
    if log_path is None:
        yield console
        return
    root, handlers = logging.getLogger(), logging.getLogger().handlers
    with open(log_path, "a") as log_file:
        to_file, to_console = logging.StreamHandler(log_file), logging.StreamHandler(console)
        to_file.setFormatter(logging.Formatter("%(asctime)s " + CONSOLE_FORMAT))
        to_console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        to_console.setLevel(logging.WARNING)
        to_console.addFilter(lambda r: r.name.split(".")[0] == "helix" or r.levelno >= logging.ERROR)
        root.handlers = [to_file, to_console]
        logging.captureWarnings(True)
        try:
            with contextlib.redirect_stderr(log_file):
                yield console
        finally:
            logging.captureWarnings(False)
            root.handlers = handlers


def model_args(spec: BackendSpec, run: Run, batch_size: int) -> dict:
    """The ``helix`` lm-eval model_args of ``spec`` in ``run``; the adapter sizes the deployment's KV capacity to
    the run's max_length."""
    names = {"model": "pretrained", "url": "base_url"}
    args = {names.get(k, k): v for k, v in dataclasses.asdict(spec).items() if v is not None}
    return {**args, "batch_size": batch_size, "max_length": run.max_length, "max_gen_toks": run.max_gen_toks or 256}


def evaluate(spec: BackendSpec, run: Run, batch_size: int, task_path: str, console: TextIO) -> dict[str, dict]:
    """lm-eval on one backend: ``{task: {sample key: record}}``, with one progress bar on ``console`` per task
    (per context length of a needle task), labelled e.g. "reference mmlu" or "helix niah_restated 8192". A
    needle task is evaluated once per context length, so that ``--limit`` counts per length and only one
    length's haystacks are held at a time."""
    import lm_eval

    from evals.lm_eval_adapter import HelixLM, Progress

    lm = HelixLM.from_model_args(model_args(spec, run, batch_size))
    out: dict[str, dict] = {}
    try:
        for task in run.tasks:
            needle = task in NEEDLE_TASKS
            out[task] = {}
            for length in run.needles.context_lengths if needle else [None]:
                label = f"{spec.backend} {task}" + (f" {length}" if needle else "")
                log.info("%s (limit %s)", label, run.limits[task])
                res = lm_eval.simple_evaluate(
                    model=lm.with_progress(Progress(label, console)), tasks=[task],
                    task_manager=task_manager(task_path, run.needles.metadata(length) if needle else None),
                    num_fewshot=None if needle else run.num_fewshot,  # needle tasks are zero-shot (no few-shot split)
                    limit=run.limits[task], log_samples=True, bootstrap_iters=0,
                    apply_chat_template=run.apply_chat_template, fewshot_as_multiturn=run.fewshot_as_multiturn,
                    gen_kwargs={"max_gen_toks": run.max_gen_toks} if run.max_gen_toks else None)
                out[task].update(samples_of(task, res))
    finally:
        lm.backend.shutdown()
    return out


def _evaluate_to_file(spec: BackendSpec, run: Run, batch_size: int, task_path: str, out_file: str,
                      log_level: int, log_path: str | None) -> None:
    """Entry point of the process that runs one backend beside the other (see ``evaluate_both``)."""
    logging.basicConfig(level=log_level, format=CONSOLE_FORMAT)
    with console_output(log_path) as console:
        samples = evaluate(spec, run, batch_size, task_path, console)
    with open(out_file, "wb") as f:
        pickle.dump(samples, f)


def evaluate_both(run: Run, args: argparse.Namespace, task_path: str, console: TextIO, log_path: str | None) -> dict:
    """``{"deployed": samples, "reference": samples}``. By default one after the other, so the reference can use
    the deployment's first device once the deployment has exited; with ``--reference-device`` the reference
    runs there, in its own process, at the same time as the deployment (on a GPU the deployment does not use),
    logging into the same ``log_path``."""
    reference = run.reference
    if not args.reference_device:
        return {"deployed": evaluate(run.deployed, run, args.batch_size, task_path, console),
                "reference": evaluate(reference, run, args.batch_size, task_path, console)}
    with tempfile.TemporaryDirectory(prefix="helix-eval-reference-") as tmp:
        out_file = os.path.join(tmp, "run.pkl")
        child = multiprocessing.get_context("spawn").Process(
            target=_evaluate_to_file, name="helix-eval-reference",
            args=(dataclasses.replace(reference, device=args.reference_device), run, args.batch_size, task_path,
                  out_file, logging.getLogger().getEffectiveLevel(), log_path))
        with children_ignore_ctrl_c():  # ended below on any exception of ours, Ctrl-C included
            child.start()
        try:
            deployed = evaluate(run.deployed, run, args.batch_size, task_path, console)
            child.join()
        finally:
            if child.is_alive():  # the deployment failed (or was interrupted): do not leave the reference running
                child.terminate()
                child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the reference run on {args.reference_device} failed (exit code {child.exitcode}); "
                               "its traceback is printed above")
        with open(out_file, "rb") as f:
            return {"deployed": deployed, "reference": pickle.load(f)}


# --------------------------------------------------------------------------------------------- report


def compare_run(run: Run, samples: dict, min_agreement: float | None, args: argparse.Namespace) -> dict:
    """The run's part of the report: its settings, per-task comparisons (with cells and the names of the heatmaps
    for needle tasks), published-figure checks and the golden-output check."""
    comparison = {t: compare_task(t, samples["deployed"][t], samples["reference"][t], min_agreement)
                  for t in run.tasks}
    model = run.deployed.model_name()
    for task, c in comparison.items():
        if task in NEEDLE_TASKS:
            c["cells"] = needle_cells(task, samples["deployed"][task], samples["reference"][task],
                                      list(run.needles.depths))
            c["heatmaps"] = {side: f"{task}-{side}.png" for side in SIDES}
    checks = {}
    for side in SIDES:
        found = [check_public_reference(e, {m: v[side] for m, v in comparison[e["task"]]["metrics"].items()},
                                        comparison[e["task"]]["n"])
                 for e in public_references(args.golden or model) if e["task"] in run.tasks]
        if found:
            checks[side] = found
    result = {**run.settings(), "comparison": comparison, "public_references": checks}
    if run.golden and os.path.exists(run.golden) and not args.write_golden:
        with open(run.golden) as f:
            golden = json.load(f)["samples"]
        bad = [k for t in run.tasks for k in golden_mismatches(t, samples["reference"][t], golden[t])]
        result["golden_outputs"] = {"file": run.golden, "checked": sum(len(samples["reference"][t]) for t in run.tasks),
                                    "mismatches": len(bad), "first": bad[:20]}
    result["passed"] = (all(c["passed"] for c in comparison.values())
                        and all(c["passed"] for cs in checks.values() for c in cs)
                        and not result.get("golden_outputs", {}).get("mismatches"))
    return result


def report_markdown(report: dict) -> str:
    setup = ("" if report["deployed_backend"] == "endpoint" else
             f"dtype {report['dtype']}, KV cache {KV_NAMES[report['kv_dtype']]}, cp {report['cp']}, "
             f"tokens_per_block {report['tokens_per_block']}, ")
    lines = [f"# helix eval: {report['deployed_backend']} vs {report['reference_backend']}", "",
             f"{setup}{report['seconds']:.0f} s"]
    if report.get("log"):
        lines += ["", f"lm-eval's log and every warning: `{report['log']}`"]
    for r in report["runs"]:
        shots = f", {r['num_fewshot']}-shot" if set(r["tasks"]) & set(DATA_TASKS) else ""
        needles = (f", context lengths {list(r['context_lengths'])}, depths {list(r['depths'])}, "
                   f"{r['samples_per_depth']} per depth" if "context_lengths" in r else "")
        chat = (f", chat template{' (few-shot as turns)' if r['fewshot_as_multiturn'] else ''}"
                if r["apply_chat_template"] else "")
        lines += ["", f"## model `{r['model']}`", "",
                  f"max_length {r['max_length']}, max_gen_toks {r['max_gen_toks'] or 'per task'}{shots}{chat}{needles}", "",
                  "| task | metric | n | deployed | reference | diff [95% CI] | agreement | threshold | pass |",
                  "|---|---|---:|---:|---:|---|---:|---:|---|"]
        for task, c in r["comparison"].items():
            for m, v in c["metrics"].items():
                lines.append(f"| {task} | {m} | {c['n']} | {v['deployed']:.2f} | {v['reference']:.2f} | "
                             f"{v['diff']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] | "
                             f"{100 * c['agreement']:.1f}% | {v['threshold_test']['threshold']:.2f} | "
                             f"{'PASS' if c['passed'] else 'FAIL'} |")
        for task, c in r["comparison"].items():
            if "cells" in c:
                lines += ["", *cells_markdown(task, c["cells"]), "",
                          " ".join(f"![{task} {side}]({name})" for side, name in c["heatmaps"].items())]
        for side, checks in r["public_references"].items():
            for c in checks:
                lines.append(f"\n{side} vs {c['model']} {c['metrics']} ({c['source'].split(' ')[0]}): score "
                             f"{c['score']:.2f}, {'threshold %.2f' % c['threshold'] if 'threshold' in c else 'floor %.2f' % c['floor']}"
                             f" -> {'PASS' if c['passed'] else 'FAIL'}{'; ' + c['note'] if 'note' in c else ''}")
        if "golden_outputs" in r:
            g = r["golden_outputs"]
            lines.append(f"\nreference vs golden outputs: {g['mismatches']} mismatches of {g['checked']} samples")
    lines.append(f"\n**overall: {'PASS' if report['passed'] else 'FAIL'}**")
    return "\n".join(lines) + "\n"


def write_heatmaps(report: dict, out: str) -> None:
    """Each needle task's heatmap per side, under the names its comparison gives."""
    for r in report["runs"]:
        model = os.path.basename(os.path.normpath(r["model"]))
        for task, c in r["comparison"].items():
            for side, name in c.get("heatmaps", {}).items():
                label = report[f"{side}_backend"]
                write_heatmap(c["cells"], side, os.path.join(out, name),
                              f"{task}: {side} ({label}), {model}, {report['dtype']}")


def write_golden(path: str, run: Run, samples: dict, dtype: str) -> None:
    """Regenerates golden/accuracy/tiny-synthetic-reference.json from the reference's predictions of ``run``."""
    settings = {k: v for k, v in run.settings().items() if k in ("tasks", "limits", "num_fewshot", "max_length",
                                                                   "max_gen_toks")}
    with open(path, "w") as f:
        json.dump({"kind": "outputs", "checkpoint": "helix make-checkpoint --preset deepseek-v3-lite-tiny "
                   "(seed 0, bfloat16 weights), reference backend in " + dtype,
                   "settings": settings, "samples": {t: samples["reference"][t] for t in run.tasks}}, f, indent=1)


def run(args: argparse.Namespace) -> dict:
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is not None:
        go_offline()
    ruler_offline()
    start = time.time()
    with task_dir(data_dir) as path:
        runs = plan(args, path)
        kv_dtype = runs[0].deployed.deployed_kv_dtype() if runs[0].deployed.backend == "helix" else "auto"
        min_agreement = args.min_agreement
        if (min_agreement is None and args.dtype in ("float32", "float64") and kv_dtype == "auto"
                and args.deployed is None):
            min_agreement = 1.0  # docs/design.md §7.3: in float32 the deployment must reproduce the oracle's predictions
        if args.write_golden and not any(r.golden for r in runs):
            raise ConfigError(f"--write-golden={args.write_golden!r}: only with the embedded default's mmlu/gsm8k run")
        os.makedirs(args.out, exist_ok=True)  # once the flags are known to be good
        log_path = None if args.verbose else os.path.join(args.out, LOG_FILE)
        with console_output(log_path) as console:
            samples = [evaluate_both(r, args, path, console, log_path) for r in runs]
    results = [compare_run(r, s, min_agreement, args) for r, s in zip(runs, samples)]
    first = runs[0].deployed
    report = {"deployed_backend": first.backend, "reference_backend": runs[0].reference.backend,
              "dtype": args.dtype, "cp": args.cp, "kv_dtype": kv_dtype,
              "tokens_per_block": args.tokens_per_block, "data": data_dir or "huggingface hub",
              "reference_device": args.reference_device or runs[0].reference.device, "seconds": time.time() - start,
              "log": log_path, "runs": results, "passed": all(r["passed"] for r in results)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump({side: {t: s[side][t] for s in samples for t in s[side]} for side in SIDES}, f)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report_markdown(report))
    write_heatmaps(report, args.out)  # after the numbers: a plotting failure loses no result
    if args.write_golden:
        golden_run, golden_samples = next((r, s) for r, s in zip(runs, samples) if r.golden)
        write_golden(args.write_golden, golden_run, golden_samples, args.dtype)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", help="comma-separated, from: " + ", ".join(TASKS) + " (default mmlu,gsm8k; embedded "
                                   "default: mmlu,gsm8k on the tiny checkpoint, niah_restated on the needle one)")
    p.add_argument("--limit", help="questions per task (per MMLU subject, per context length of a needle task): N, "
                                   "or task=N,task=N (embedded default mmlu=2,gsm8k=20; otherwise all)")
    p.add_argument("--num-fewshot", type=int, default=5, help="few-shot examples of mmlu/gsm8k (needle tasks: none)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the checkpoint tokenizer's chat template (lm-eval's --apply_chat_template; "
                        "off by default: vLLM's and TensorRT-LLM's published DeepSeek GSM8K figures are without it)")
    p.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction,
                   help="with --apply-chat-template: few-shot examples as user/assistant turns (default on, as in lm-eval)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF checkpoint directory (default: the embedded synthetic checkpoints)")
    src.add_argument("--config", help="deployment file (YAML or JSON) with model / context_servers / generation_servers")
    src.add_argument("--deployed", metavar="URL", help="an OpenAI-compatible completions server to evaluate (helix "
                                                      "serve, vLLM, trtllm-serve, SGLang), e.g. http://host:8000/v1")
    p.add_argument("--reference", metavar="URL", help="with --deployed: the endpoint it is compared against")
    p.add_argument("--reference-model", metavar="DIR", help="with --deployed: compare against the single-device "
                                                             "reference on this checkpoint instead")
    p.add_argument("--tokenizer", metavar="DIR", help="with --deployed: the served model's tokenizer, which lm-eval "
                                                       "measures and cuts prompts with (default: --reference-model)")
    p.add_argument("--cp", type=int, default=2, help="Helix generation context_parallel_size (with --model)")
    p.add_argument("--tokens-per-block", type=int, default=32)
    p.add_argument("--backend", choices=("helix", "reference"), default="helix",
                   help="what is compared against the reference (reference: the pipeline checking itself)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-dtype", choices=["auto", "fp8"], default="auto",
                   help="with --model: the deployment's KV cache, kv_cache_config.dtype (auto: the model's dtype; fp8: "
                        "e4m3 latent rows with a per-row scale); the reference always keeps its own unquantized")
    p.add_argument("--colocate", action="store_true",
                   help="with --model on CUDA: the context server shares generation rank 0's GPU (N GPUs, not N + 1)")
    p.add_argument("--reference-attention", choices=list(ATTENTION), default="plain",
                   help="the reference's prefill attention: plain (chunked, the definition) or sdpa (torch's fused "
                        "kernel, checked against plain in the tests; what makes 1M-token prompts take seconds on a GPU)")
    p.add_argument("--reference-device",
                   help="run the reference on this device (e.g. cuda:3, a GPU the deployment leaves free) at the same "
                        "time as the deployment, in its own process (default: on --device, after the deployment)")
    p.add_argument("--data-dir", help="local mmlu/ and gsm8k/ data (default $HELIX_EVAL_DATA, else the HF hub)")
    p.add_argument("--out", default=os.path.join("runs", "eval"),
                   help=f"output directory (results.json, report.md, samples.json, needle heatmaps, {LOG_FILE})")
    p.add_argument("-v", "--verbose", action="store_true",
                   help=f"print lm-eval's log lines and its own progress bars as they come (default: they go to "
                        f"OUT/{LOG_FILE}; the console shows one progress bar per backend and task, then the report)")
    p.add_argument("--max-length", type=int, help="tokens the model sees; longer prompts are cut from the left; also "
                                                  "the deployment's KV capacity (embedded default 1024 for mmlu/gsm8k; "
                                                  "with needle tasks the largest context length plus the generation "
                                                  "cap; otherwise the checkpoint's max_position_embeddings, or with "
                                                  "--config the file's KV capacity if smaller; at most that capacity)")
    p.add_argument("--max-gen-toks", type=int, help="generation cap (embedded default 32 for mmlu/gsm8k; "
                                                    "otherwise the task's)")
    p.add_argument("--context-lengths", help="needle tasks: comma-separated context lengths in tokens, each at most "
                                             "the checkpoint's max_position_embeddings (embedded default 2048,8192; "
                                             "otherwise RULER's 4096)")
    p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)),
                   help="niah_restated: needle depths in percent of the haystack (default %(default)s); the report "
                        "bins every needle task's samples to the nearest of them")
    p.add_argument("--samples-per-depth", type=int, default=1,
                   help="niah_restated: samples per (context length, depth), each with its own seeded key and value")
    p.add_argument("--batch-size", type=int, default=64, help="requests per backend call")
    p.add_argument("--min-agreement", type=float,
                   help="fail a task below this per-sample agreement (default 1.0 in float32/float64 with the KV cache in "
                        "the model's dtype; none in bf16 or with an FP8 KV cache)")
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
    logging.basicConfig(level=logging.INFO, format=CONSOLE_FORMAT)
    main(parser.parse_args())
