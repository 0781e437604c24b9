"""Per-sample predictions out of lm-eval results, and the comparison of two runs on the same samples.

A sample's key is ``SUBTASK/doc_id`` (``TASK/LENGTH/doc_id`` for a needle task). MMLU keeps the chosen letter
(argmax of the four log-likelihoods) and those log-likelihoods; GSM8K and the needle tasks keep the generated text
and the answer each filter extracted; a needle sample also keeps its context length and needle depth. Scores are
percentages.
"""

from __future__ import annotations

import json
import os

from evals.stats import ThresholdTest, paired_difference
from evals.task_data import NEEDLE_TASKS

# The metrics reported per task, as lm-eval names them (metric,filter). The needle tasks' is RULER's
# string_match_all (lm-eval's RULER tasks name it after the sample's length, see needle_score).
NEEDLE_METRIC = "string_match_all,none"
TASK_METRICS = {"mmlu": ("acc,none",), "gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
                **{t: (NEEDLE_METRIC,) for t in NEEDLE_TASKS}}


def needle_score(entry: dict) -> float:
    """A needle sample's string_match_all: lm-eval's RULER tasks report it under the sample's max_length (and -1
    under RULER's default lengths), niah_restated under its name."""
    doc = entry["doc"]
    return float(entry["string_match_all"] if "string_match_all" in entry else entry[str(doc["max_length"])])


def needle_depth(doc: dict) -> float:
    """Where the needle sits, in percent of the input: the requested depth where the sample records it
    (niah_restated), else the character offset of the (first) expected value over the input's length."""
    if "depth" in doc:
        return doc["depth"]
    return 100 * doc["input"].index(doc["outputs"][0]) / len(doc["input"])


def samples_of(task: str, results: dict) -> dict[str, dict]:
    """``{key: {"scores": {metric: 0|1}, ...prediction}}`` from ``simple_evaluate(..., log_samples=True)``."""
    out: dict[str, dict] = {}
    for subtask, entries in results["samples"].items():
        for e in entries:
            if task in NEEDLE_TASKS:
                rec = out.setdefault(f"{subtask}/{e['doc']['max_length']}/{e['doc_id']}", {"scores": {}})
                rec.update(length=e["doc"]["max_length"], depth=needle_depth(e["doc"]))
                rec["scores"][NEEDLE_METRIC] = needle_score(e)
            else:
                rec = out.setdefault(f"{subtask}/{e['doc_id']}", {"scores": {}})
                for metric in e["metrics"]:
                    rec["scores"][f"{metric},{e['filter']}"] = float(e[metric])
            if task == "mmlu":
                logprobs = [float(lp) for lp, _ in e["filtered_resps"]]
                rec.update(choice=max(range(len(logprobs)), key=logprobs.__getitem__), logprobs=logprobs)
            else:
                rec["text"] = e["resps"][0][0]
                rec.setdefault("answers", {})[e["filter"]] = e["filtered_resps"][0]
    return out


def same_prediction(task: str, a: dict, b: dict) -> bool:
    """MMLU: the same argmax choice. GSM8K, needles: the same generated text and the same extracted answers."""
    if task == "mmlu":
        return a["choice"] == b["choice"]
    return a["text"] == b["text"] and a["answers"] == b["answers"]


def compare_task(task: str, deployed: dict[str, dict], reference: dict[str, dict],
                 min_agreement: float | None = None) -> dict:
    """Both scores, agreement, the paired difference (deployed - reference) with its 95% interval, and pass/fail.

    Pass: every metric clears TensorRT-LLM's one-sided threshold computed from the reference score on these
    n samples, and (if given) the agreement rate is at least ``min_agreement``."""
    if set(deployed) != set(reference):
        raise ValueError(f"{task}: the two runs scored different samples "
                         f"({len(set(deployed) ^ set(reference))} keys differ)")
    keys = sorted(reference)
    agree = [k for k in keys if same_prediction(task, deployed[k], reference[k])]
    metrics = {}
    for m in TASK_METRICS[task]:
        a = [100 * reference[k]["scores"][m] for k in keys]
        b = [100 * deployed[k]["scores"][m] for k in keys]
        diff = paired_difference(a, b)
        test = ThresholdTest(reference=sum(a) / len(a), num_samples=len(a))
        metrics[m] = {"deployed": sum(b) / len(b), "reference": sum(a) / len(a),
                      "diff": diff.diff, "ci95": [diff.low, diff.high], "threshold_test": test.report(sum(b) / len(b))}
    agreement = len(agree) / len(keys)
    passed = all(v["threshold_test"]["passed"] for v in metrics.values())
    if min_agreement is not None:
        passed = passed and agreement >= min_agreement
    return {"task": task, "n": len(keys), "agreement": agreement, "min_agreement": min_agreement,
            "disagreements": [k for k in keys if k not in set(agree)][:20], "metrics": metrics, "passed": passed}


# --------------------------------------------------------------------------------------------- golden files

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "accuracy")


def public_references(model_name: str) -> list[dict]:
    """The published figures in golden/accuracy/*.json whose ``model`` ends with ``model_name`` (case-insensitive)."""
    found = []
    for name in sorted(n for n in os.listdir(GOLDEN_DIR) if n.endswith(".json")):  # run reports live in subfolders
        with open(os.path.join(GOLDEN_DIR, name)) as f:
            entry = json.load(f)
        if entry.get("kind") == "public" and entry["model"].lower().split("/")[-1] == model_name.lower().split("/")[-1]:
            found.append(entry)
    return found


def check_public_reference(entry: dict, scores: dict[str, float], n: int) -> dict:
    """A run's per-metric scores (percent) against one published figure: TensorRT-LLM's threshold test, or a
    plain floor. The figure's score is the mean of its ``metrics`` (TensorRT-LLM averages GSM8K's two filters)."""
    score = sum(scores[m] for m in entry["metrics"]) / len(entry["metrics"])
    if entry["test"] == "trtllm":
        test = ThresholdTest(reference=entry["reference"], num_samples=entry["num_samples"],
                             alpha=entry["alpha"], beta=entry["beta"], sigma=entry["sigma"])
        result = test.report(score)
    else:
        result = {"floor": entry["reference"], "score": score, "passed": score >= entry["reference"]}
    if n < entry["num_samples"]:
        result["note"] = f"scored on {n} samples; the reference used {entry['num_samples']}"
    return {"model": entry["model"], "source": entry["source"], "metrics": entry["metrics"], **result}


def golden_mismatches(task: str, samples: dict[str, dict], golden: dict[str, dict], atol: float = 1e-3) -> list[str]:
    """Keys of ``samples`` whose prediction differs from the golden one (MMLU log-likelihoods within ``atol``)."""
    bad = []
    for key, rec in samples.items():
        want = golden.get(key)
        if want is None or not same_prediction(task, rec, want):
            bad.append(key)
        elif task == "mmlu" and max(abs(x - y) for x, y in zip(rec["logprobs"], want["logprobs"])) > atol:
            bad.append(key)
    return bad
