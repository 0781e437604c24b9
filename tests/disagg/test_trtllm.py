"""TensorRT-LLM's disaggregated configuration, as written (trtllm_helix.yaml: its Helix accuracy deployment).

It loads as context server TP 2 + Helix CP 2, naming the keys that change nothing here in one INFO line; a value
this runtime cannot honour, or a key it does not know, is refused naming the key and the rule; and the
deployment produces the reference's greedy tokens and scores, in process and from ``helix generate --config`` on
the file across two torchrun "nodes" on the loopback address. (``helix generate --config`` without torchrun runs
the same parsed spec: tests/disagg/test_disagg_cli.py.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from helix.config import ConfigError, HelixConfig
from helix.disagg import launch, load_deployment
from helix.engine import Request
from helix.sampling import SamplingParams
from helix.spec import ContextServerConfig
from helix.tokenizer import load_tokenizer
from tests.disagg.conftest import deployment, with_key
from tests.tolerance import assert_exact, assert_f32_parity

SEED = Path(__file__).with_name("trtllm_helix.yaml")
REPO = Path(__file__).resolve().parents[2]

# Blocks of 32: the 100-token prompt prefills 99 tokens, blocks 0..3 (the last partial), two per generation rank,
# each handed over by a different context rank; 3 tokens fit in part of one block.
PROMPTS = [list(range(100, 200)), [3, 1, 4], list(range(40, 77))]
NEW_TOKENS = 6
SCORE = [(list(range(150, 230)), [5, 80, 81, 200, 7]), ([5], [6, 7, 8])]


def seed(model_dir) -> dict:
    """The TensorRT-LLM file with its ``model`` pointed at ``model_dir``."""
    raw = yaml.safe_load(SEED.read_text())
    raw["model"] = str(model_dir)
    return raw


def write_seed(model_dir, tmp_path: Path) -> Path:
    path = tmp_path / "trtllm_helix.yaml"
    path.write_text(yaml.safe_dump(seed(model_dir)))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def torchrun_nodes(rdzv: dist.TCPStore, helix_args: list[str], stderr) -> list[subprocess.Popen]:
    """`helix HELIX_ARGS` on two torchrun "nodes" of two processes each on the loopback address, meeting at the
    rendezvous store ``rdzv``, which the caller hosts and holds (both agents join it as clients)."""
    run_id = uuid.uuid4().hex
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                              "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-id", run_id,
                              "--rdzv-endpoint", f"127.0.0.1:{rdzv.port}", "--rdzv-conf", "is_host=false",
                              "--local-addr", "127.0.0.1", "--max-restarts", "0", "-m", "helix", *helix_args],
                             stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env())
            for i in range(2)]


# --------------------------------------------------------------------------------------------- loading


def test_the_file_loads_as_written_and_names_what_changes_nothing(tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="helix.disagg.deploy"):
        spec = load_deployment(seed(tiny_checkpoint))
    assert spec.context == ContextServerConfig(tensor_parallel_size=2, tokens_per_block=32, max_tokens=8192)
    assert spec.generation == HelixConfig(context_parallel_size=2, tokens_per_block=32)
    assert (spec.context_ranks, spec.generation_ranks) == ([0, 1], [2, 3])
    lines = [r.getMessage() for r in caplog.records if "TensorRT-LLM keys" in r.getMessage()]
    assert len(lines) == 1, lines
    for key in ["hostname='localhost'", "port=8000", "backend='pytorch'", "free_gpu_memory_fraction=0.25",
                "disable_overlap_scheduler=True", "cache_transceiver_config={'backend': 'DEFAULT'}",
                "context_servers.num_instances=1", "context_servers.urls=['localhost:8001']",
                "context_servers.enable_chunked_prefill=False", "context_servers.kv_cache_config.enable_block_reuse=False",
                "generation_servers.kv_cache_config.enable_partial_reuse=False", "generation_servers.urls=['localhost:8002']"]:
        assert key in lines[0], f"{key} not in {lines[0]}"


def test_a_native_file_lists_nothing(tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="helix.disagg.deploy"):
        load_deployment(deployment(tiny_checkpoint))
    assert not [r for r in caplog.records if "TensorRT-LLM" in r.getMessage()]


# (dotted path, value, substrings of the one-line error: key=value, rule)
REFUSED = [
    ("generation_servers.kv_cache_config.enable_block_reuse", True,
     ["generation_servers.kv_cache_config.enable_block_reuse=True", "must be False", "no prefix cache"]),
    ("context_servers.kv_cache_config.enable_partial_reuse", True,
     ["context_servers.kv_cache_config.enable_partial_reuse=True", "must be False"]),
    ("generation_servers.num_instances", 2, ["generation_servers.num_instances=2", "must be 1", "no router"]),
    ("context_servers.urls", ["localhost:8001", "localhost:8003"], ["context_servers.urls=", "a list of one 'host:port'"]),
    ("context_servers.enable_chunked_prefill", True, ["context_servers.enable_chunked_prefill=True", "one pass"]),
    ("backend", "trt", ["backend='trt'", "must be 'pytorch'", "builds no TensorRT engines"]),
    ("free_gpu_memory_fraction", 1.5, ["free_gpu_memory_fraction=1.5", "a number in (0, 1]"]),
    ("cache_transceiver_config", {"backend": "TCP"}, ["cache_transceiver_config={'backend': 'TCP'}", "backend must be one of"]),
    ("context_servers.pipeline_parallel_size", 2, ["context_servers.pipeline_parallel_size=2", "no pipeline parallelism"]),
    ("port", "8000", ["port='8000'", "integer port"]),
    ("context_servers.disable_overlap_scheduler", False,
     ["context_servers.disable_overlap_scheduler=False", "differs from the top-level disable_overlap_scheduler=True"]),
    ("context_servers.tensor_parallel_size", 5, ["context_servers.tensor_parallel_size=5", "must divide num_attention_heads=12"]),
    ("context_servers.colocate", True, ["context_servers.colocate=True", "needs tensor_parallel_size 1"]),
    ("generation_servers.tensor_parallel_size", 2, ["generation_servers.tensor_parallel_size=2", "TPA = 1"]),
    ("generation_servers.speculative_config", {"decoding_type": "MTP"},
     ["generation_servers.speculative_config=", "unknown generation-server key"]),
    ("context_servers.max_num_tokens", 3000, ["context_servers.max_num_tokens=3000", "unknown key"]),
    ("max_retries", 3, ["max_retries=3", "unknown section"]),
]


@pytest.mark.parametrize("path,value,expected", REFUSED, ids=[f"{p}={v!r}" for p, v, _ in REFUSED])
def test_what_cannot_be_honoured_is_refused_naming_key_and_rule(tiny_checkpoint, path, value, expected):
    with pytest.raises(ConfigError) as info:
        load_deployment(with_key(seed(tiny_checkpoint), path, value))
    for part in expected:
        assert part in str(info.value), f"{part!r} not in {info.value}"


# --------------------------------------------------------------------------------------------- running


def test_context_tp2_helix_cp2_generates_and_scores_as_the_reference(tiny_checkpoint, reference):
    with launch(seed(tiny_checkpoint)) as cluster:
        results = cluster.run([Request(i, p, SamplingParams(max_new_tokens=NEW_TOKENS), keep_logits=True)
                               for i, p in enumerate(PROMPTS)])
        scores = cluster.score(SCORE)
    for res, prompt in zip(results, PROMPTS):
        tokens, logits = reference.generate(prompt, NEW_TOKENS, return_logits=True)
        assert_exact(torch.tensor(res.token_ids), torch.tensor(tokens), f"{len(prompt)}-token prompt: greedy tokens")
        for step, (a, b) in enumerate(zip(res.logits, logits)):
            assert_f32_parity(a, b, f"{len(prompt)}-token prompt, step {step}")
    for i, ((logprobs, greedy), (context, continuation)) in enumerate(zip(scores, SCORE)):
        want_lp, want_greedy = reference.score(context, continuation)
        assert_f32_parity(torch.tensor(logprobs), torch.tensor(want_lp), f"score request {i}: log-probs")
        assert greedy == want_greedy


def test_helix_generate_on_the_file_across_two_torchrun_nodes_prints_the_reference_tokens(tiny_checkpoint, reference,
                                                                                         tmp_path):
    """As a new user would: the TensorRT-LLM file, `helix generate --config` on it, on two torchrun "nodes" on the
    loopback address with two processes each: world ranks 0-1 the context server, 2-3 the generation server,
    roles from the file; world rank 0 prints once, and each process names the inert keys in one line.

    The rendezvous store is this test's: a TCPStore on a port the OS picks, held for the test's life (as RankPool
    holds its store), which both agents join as clients (is_host=false). Picking a free port and handing it to
    the agent that should bind it would race with every other socket on the host (xdist workers, other tests)."""
    rdzv = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # held until the test ends
    nodes = torchrun_nodes(rdzv, ["generate", "--config", str(write_seed(tiny_checkpoint, tmp_path)), "--prompt-ids",
                                  ",".join(map(str, PROMPTS[0])), "--max-new-tokens", str(NEW_TOKENS), "--json"],
                           stderr=subprocess.PIPE)
    try:
        outs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err
        assert err.count("TensorRT-LLM keys accepted that change nothing here") == 2, err  # once per process
    printed = [line for out, _ in outs for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1, outs  # world rank 0 alone prints
    want = reference.generate(PROMPTS[0], NEW_TOKENS, eos_token_ids=reference.cfg.eos_token_ids)
    assert json.loads(printed[0])["token_ids"] == want


def test_helix_serve_on_the_file_across_two_torchrun_nodes_answers_with_the_reference_tokens(tiny_checkpoint,
                                                                                             reference, tmp_path):
    """`helix serve --config` on the same two torchrun "nodes": world rank 0 binds the socket and serves HTTP over
    the four ranks (its serving loop's events travel through the world's store), the others serve its commands; a
    completion is the reference's greedy continuation, and SIGTERM ends every process."""
    import signal
    import threading

    import requests

    rdzv = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # held until the test ends
    nodes = torchrun_nodes(rdzv, ["serve", "--config", str(write_seed(tiny_checkpoint, tmp_path)), "--port", "0"],
                           stderr=subprocess.DEVNULL)
    announced: list[str] = []
    for node in nodes:  # the node that got world rank 0 announces the URL
        threading.Thread(target=lambda out: announced.extend(line for line in out if "helix serve:" in line),
                         args=(node.stdout,), daemon=True).start()
    try:
        for _ in range(1200):
            if announced or any(node.poll() is not None for node in nodes):
                break
            time.sleep(0.1)
        assert len(announced) == 1, f"announced: {announced}, exit codes {[node.poll() for node in nodes]}"
        url = announced[0].split()[2]
        body = {"prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0}
        got = requests.post(url + "/completions", json=body, timeout=120).json()["choices"][0]["text"]
        want_ids = reference.generate(PROMPTS[0], NEW_TOKENS, eos_token_ids=reference.cfg.eos_token_ids)
        want = load_tokenizer(tiny_checkpoint).decode(want_ids, skip_special_tokens=True)
        assert got == want
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            node.wait(timeout=60)
    finally:
        for node in nodes:
            node.kill()
