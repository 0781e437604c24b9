"""The ``helix`` command.

    helix make-checkpoint --preset NAME --out DIR [--seed S] [--dtype D] [--dry-run]
    helix eval [--tasks mmlu,gsm8k] [--limit N] [--model DIR | --config DEPLOY] [--cp N] ...   (evals/run.py)
    helix bench [--layers L] [--batch 1 8] [--context ...] [--configs singlex1 helixx2 ...]   (helix/bench.py)
    helix generate [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3) --max-new-tokens N
                   --backend reference [--dtype float32|bfloat16|float64] [--device cpu|cuda] [--json]
    helix generate --config DEPLOY.yaml (--prompt TEXT | --prompt-ids 1,2,3) --max-new-tokens N [--json]
    helix serve [--config DEPLOY.yaml | --model DIR --cp N ...] [--host 127.0.0.1] [--port 8000]
    helix bench-serve [--config DEPLOY.yaml | --model DIR --cp N ...] [--requests 64] [--clients 8]

Each subcommand is one ``add_<name>(subparsers)`` function that registers its flags and handler. This module
holds the runtime's (``python -m helix``); the accuracy suite sits above the runtime, so ``eval`` is added by
evals/cli.py, which is the installed ``helix`` command (``python -m evals`` without installing). A generate
backend is one entry of ``BACKENDS``: ``(args, model_dir, prompt_ids) -> generated ids``; its own flags go
into ``add_generate``. Invalid settings or inputs (``ConfigError``, ``CheckpointError``) and failed requests
(``RequestError``, ``NonFiniteLogits``: e.g. NaN logits) end the command with a one-line message on stderr and
exit status 1, without a traceback; Ctrl-C with one line and exit status 130, once every rank is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

import torch

from helix.checkpoint import (CHECKPOINT_DTYPES, DEFAULT_PRESET, DTYPES, CheckpointError, check_checkpoint,
                              ensure_checkpoint, make_checkpoint)
from helix.config import ConfigError, ModelConfig
from helix.engine import RequestError
from helix.presets import PRESETS
from helix.sampling import NonFiniteLogits
from helix.tokenizer import load_tokenizer
from helix.workers import TorchrunEnv, WorkerError

log = logging.getLogger("helix")


# --------------------------------------------------------------------------------------------- generate


def generate_reference(args: argparse.Namespace, model_dir: str, prompt_ids: list[int]) -> list[int]:
    """The single-device oracle (helix/reference.py)."""
    from helix.reference import ReferenceModel

    model = ReferenceModel.from_checkpoint(model_dir, dtype=DTYPES[args.dtype], device=args.device)
    return model.generate(prompt_ids, args.max_new_tokens, eos_token_ids=model.cfg.eos_token_ids)


def generate_helix(args: argparse.Namespace, model_dir: str, prompt_ids: list[int]) -> list[int]:
    """Helix decode on --cp ranks: spawned locally (gloo on CPU, one GPU per rank on CUDA), or this process is
    one rank when started by torchrun (WORLD_SIZE set); then only rank 0 prints."""
    from helix.config import HelixConfig
    from helix.engine import Request
    from helix.runner import helix_generate, torchrun_generate
    from helix.sampling import SamplingParams
    from helix.spec import Execution, RunSpec

    cfg = check_checkpoint(model_dir)  # here, not in a rank: a damaged checkpoint ends the command in one line
    helix_cfg = HelixConfig(context_parallel_size=args.cp, tokens_per_block=args.tokens_per_block, max_batch_size=1,
                            max_tokens=max(len(prompt_ids) + args.max_new_tokens, args.tokens_per_block))
    helix_cfg.validate()
    helix_cfg.validate_for_model(cfg)
    if args.dtype == "float64":
        raise ConfigError("--dtype='float64': the Helix runtime computes in float32 or bfloat16 "
                          "(float64 is for the reference oracle)")
    spec = RunSpec(model=model_dir, dtype=args.dtype, device=args.device,
                   generation=helix_cfg, execution=Execution.from_env())
    request = Request(0, prompt_ids, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                    stop_token_ids=tuple(cfg.eos_token_ids)))
    if (env := TorchrunEnv.from_env(os.environ)) is not None:
        results = torchrun_generate(spec, [request], env)
        if results is None:
            sys.exit(0)  # non-zero ranks print nothing
    else:
        results = helix_generate(spec, [request])
    RequestError.raise_if_failed(results)
    return results[0].token_ids


def generate_disagg(args: argparse.Namespace, model_dir: str, prompt_ids: list[int]) -> list[int]:
    """Disaggregated serving from the deployment file --config: a context server prefills, the Helix generation
    server decodes (helix/disagg); model, dtype, device and N come from the file. Under torchrun (WORLD_SIZE set,
    on one node or many) this process is one rank of the deployment and world rank 0 drives and prints."""
    from helix.disagg import launch
    from helix.disagg.torchrun import drive
    from helix.sampling import SamplingParams

    eos = tuple(ModelConfig.from_json(model_dir).eos_token_ids)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=eos)
    if (env := TorchrunEnv.from_env(os.environ)) is not None:
        ids = drive(args.config, env, lambda cluster: cluster.generate([prompt_ids], params)[0])
        if ids is None:
            sys.exit(0)  # the other ranks print nothing
        return ids
    with launch(args.config) as cluster:
        return cluster.generate([prompt_ids], params)[0]


BACKENDS: dict[str, Callable[[argparse.Namespace, str, list[int]], list[int]]] = {
    "reference": generate_reference,
    "helix": generate_helix,
    "disagg": generate_disagg,
}


def _backend_and_model(args: argparse.Namespace) -> tuple[str, str]:
    """--config means the disaggregated backend, on the deployment's model; otherwise --model or the default."""
    if args.config is None:
        if args.backend == "disagg":
            raise ConfigError("--backend='disagg': needs --config DEPLOY.yaml (the deployment file)")
        return args.backend or "reference", args.model or ensure_checkpoint(DEFAULT_PRESET)
    from helix.disagg import load_deployment

    if args.backend not in (None, "disagg") or args.model is not None:
        raise ConfigError(f"--config={args.config!r}: the deployment file names the model and runs the disagg "
                          "backend; drop --model and --backend")
    args.config = load_deployment(args.config)  # parsed once: the RunSpec the backend launches
    return "disagg", args.config.model


def _prompt_ids(args: argparse.Namespace, tokenizer, cfg: ModelConfig) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids={args.prompt_ids!r}: must be comma-separated integers") from None
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt={args.prompt_ids if args.prompt is None else args.prompt!r}: must hold at least one token")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ConfigError(f"--prompt-ids={bad[0]}: token ids must be in [0, vocab_size={cfg.vocab_size})")
    if len(ids) + args.max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens}: prompt ({len(ids)} tokens) plus new tokens exceed "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    return ids


def run_generate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device='cuda': no CUDA device is visible to torch; use --device cpu")
    args.backend, model_dir = _backend_and_model(args)
    cfg = ModelConfig.from_json(model_dir)
    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model={model_dir!r}: no loadable tokenizer files ({str(e).splitlines()[0]})") from None
    prompt_ids = _prompt_ids(args, tokenizer, cfg)
    log.info("%s backend: %d prompt tokens, up to %d new, %s on %s", args.backend, len(prompt_ids),
             args.max_new_tokens, args.dtype, args.device)
    ids = [int(i) for i in BACKENDS[args.backend](args, model_dir, prompt_ids)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    print(json.dumps({"token_ids": ids, "text": text}) if args.json else text)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation on one checkpoint",
                       description="Greedy generation. Without --model, uses the embedded default: the "
                                   f"{DEFAULT_PRESET} synthetic checkpoint, written on first use.")
    p.add_argument("--model", help="HF checkpoint directory (default: the embedded tiny synthetic checkpoint)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text, encoded with the checkpoint's tokenizer")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated (e.g. 1,2,3)")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--backend", choices=sorted(BACKENDS), help="default: reference, or disagg with --config")
    p.add_argument("--config", help="deployment file (YAML or JSON): context server + Helix generation server")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32",
                   help="compute dtype (default float32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cp", type=int, default=2, help="helix backend: Helix ranks N (context_parallel_size, >= 2)")
    p.add_argument("--tokens-per-block", type=int, default=32,
                   help="helix backend: KV block size; block b lives on rank b mod N (default 32)")
    p.add_argument("--json", action="store_true",
                   help='print {"token_ids": [...], "text": "..."} (generated tokens only) as the last line')
    p.set_defaults(func=run_generate)


# --------------------------------------------------------------------------------------------- make-checkpoint


def run_make_checkpoint(args: argparse.Namespace) -> None:
    plan = make_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype, dry_run=args.dry_run)
    print(f"{args.preset}: {plan.describe()}")
    print("dry run: nothing written" if args.dry_run else f"wrote {args.out}")


def add_make_checkpoint(sub) -> None:
    p = sub.add_parser("make-checkpoint", help="write a synthetic HF checkpoint of a preset",
                       description="Random weights in the exact Hugging Face format, config.json, "
                                   "generation_config.json and a byte-level tokenizer.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", help="directory to create (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(CHECKPOINT_DTYPES), default="bfloat16",
                   help="weight dtype (default bfloat16); fp8: DeepSeek's FP8 format, e4m3 projections with a float32 "
                        "scale per 128 x 128 block")
    p.add_argument("--dry-run", action="store_true", help="print parameter count and bytes; write nothing")
    p.set_defaults(func=run_make_checkpoint)


# --------------------------------------------------------------------------------------------- serve


def deployment_from_args(args: argparse.Namespace):
    """--config, or context 1 + Helix generation CP --cp on --model (default: the embedded tiny checkpoint)."""
    from helix.disagg import from_checkpoint

    if args.config is not None:
        if args.model is not None:
            raise ConfigError(f"--config={args.config!r}: the deployment file names the model; drop --model")
        return args.config
    return from_checkpoint(args.model or ensure_checkpoint(DEFAULT_PRESET), cp=args.cp,
                           tokens_per_block=args.tokens_per_block, dtype=args.dtype, device=args.device,
                           max_tokens=args.max_tokens, max_batch_size=args.max_batch_size)


def add_deployment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="deployment file (YAML or JSON): context server + Helix generation server")
    p.add_argument("--model", help="without --config: HF checkpoint directory (default: the embedded tiny synthetic "
                                   "checkpoint), served by context server 1 + Helix generation server --cp")
    p.add_argument("--cp", type=int, default=2, help="without --config: generation context_parallel_size N (default 2)")
    p.add_argument("--tokens-per-block", type=int, default=32, help="without --config: KV block size (default 32)")
    p.add_argument("--max-tokens", type=int, help="without --config: KV capacity per sequence (default 8192)")
    p.add_argument("--max-batch-size", type=int, help="without --config: decode batch slots (default 8)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def import_serve():
    """helix/serve's server module; its web stack is the optional `serve` extra."""
    try:
        from helix.serve import server
    except ImportError as e:
        raise ConfigError(f"helix serve needs FastAPI and uvicorn ({e}): pip install 'helix-decode[serve]'") from None
    return server


def run_serve(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE set, on one node or many) this process is one rank of the deployment; world rank
    0 serves HTTP."""
    serve = import_serve().serve
    serve(deployment_from_args(args), args.host, args.port, args.served_model_name,
          announce=lambda line: print(line, flush=True), torchrun=TorchrunEnv.from_env(os.environ))


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible completions endpoint over the disaggregated deployment",
                       description="POST /v1/completions (text or token-id prompts, max_tokens, temperature, top_p, "
                                   "seed, stop, echo, logprobs, stream), GET /v1/models, GET /health. Concurrent "
                                   "requests join the running decode batch. Without --config or --model, serves the "
                                   f"embedded default: the {DEFAULT_PRESET} synthetic checkpoint, context server 1 + "
                                   "Helix generation server N=2 on CPU.")
    add_deployment_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: a free port, printed at start")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the model path)")
    p.set_defaults(func=run_serve)


def run_bench_serve(args: argparse.Namespace) -> None:
    import_serve()
    from helix.bench_serve import markdown, run_bench_serve

    result = run_bench_serve(deployment_from_args(args), args.out, args.requests, args.clients, args.max_prompt,
                             args.max_new)
    print(markdown(result))


def add_bench_serve(sub) -> None:
    p = sub.add_parser("bench-serve", help="requests/s and latency of helix serve: 1 client vs K concurrent clients",
                       description="Starts the deployment behind helix serve on a loopback port and sends the same "
                                   "seeded greedy workload one request at a time, then from --clients threads at once "
                                   "(continuous batching); JSON and markdown in --out.")
    add_deployment_flags(p)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=256, help="prompts of 16..N tokens")
    p.add_argument("--max-new", type=int, default=32, help="8..N new tokens per request")
    p.add_argument("--out", default="golden/perf")
    p.set_defaults(func=run_bench_serve)


# --------------------------------------------------------------------------------------------- bench


def run_bench_cmd(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise ConfigError("bench: no CUDA device is visible to torch; the decode benchmark needs GPUs")
    from helix.bench import markdown_table, profile_text, run_bench
    from helix.spec import Execution

    configs = [(c.rsplit("x", 1)[0], int(c.rsplit("x", 1)[1])) for c in args.configs] if args.configs else None
    result = run_bench(args.out, args.preset, args.layers, args.gpus, args.batch, args.context, args.tokens_per_block,
                       args.iters, configs, args.profile, args.moe_parallel, Execution.from_env(),
                       tuple(dict.fromkeys(args.kv_dtype)))
    print(markdown_table(result))
    if args.profile:
        print(profile_text(result))


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="decode latency vs context: single GPU, TP attention, Helix (CUDA)",
                       description="Token-to-token latency of the whole decode step (one CUDA graph) on synthetic "
                                   "weights; baselines in the same run; JSON, markdown and PNG plots in --out.")
    p.add_argument("--preset", default="deepseek-v3-lite", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4: the single-GPU baseline's "
                   "whole cache must fit at B=8, 1M tokens)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, nargs="+", default=[65536, 131072, 524288, 1048576])
    p.add_argument("--tokens-per-block", type=int, default=64)
    p.add_argument("--iters", type=int, default=60, help="timed CUDA-graph replays per point (median reported)")
    p.add_argument("--configs", nargs="+", help="e.g. singlex1 tpx4 helixx2 helixx4 (default: all that fit --gpus)")
    p.add_argument("--out", default="golden/perf")
    p.add_argument("--profile", action="store_true", help="also list each step's GPU kernels by time (torch.profiler)")
    p.add_argument("--moe-parallel", choices=["ep", "tp"], default="ep",
                   help="routed experts expert- (ep) or tensor-parallel (tp), as moe_parallel in a deployment file")
    p.add_argument("--kv-dtype", nargs="+", choices=["auto", "fp8"], default=["auto"],
                   help="KV cache dtype(s), each config measured with each: auto (bf16), fp8 (e4m3, a scale per row); "
                        "e.g. --kv-dtype auto fp8 for the FP8 cache beside its bf16 baseline")
    p.set_defaults(func=run_bench_cmd)


# --------------------------------------------------------------------------------------------- entry point


COMMANDS = (add_generate, add_make_checkpoint, add_serve, add_bench, add_bench_serve)


def build_parser(commands: Sequence[Callable] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helix", description="Helix context-parallel decode for DeepSeek-V3-style models")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in commands:
        add(sub)
    return parser


def main(argv: list[str] | None = None, commands: Sequence[Callable] = COMMANDS) -> int:
    """The runtime's subcommands; the installed ``helix`` command (evals/cli.py) adds ``eval`` above them."""
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "make-checkpoint" and not args.dry_run and not args.out:
        parser.error("make-checkpoint: --out is required unless --dry-run")
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ConfigError, CheckpointError, RequestError, NonFiniteLogits) as e:
        print("helix: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except WorkerError as e:  # a rank raised or died: its name and traceback, no driver traceback
        print(f"helix: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the ranks are gone: a pool or cluster shuts down on any exception, this one too
        print("helix: interrupted", file=sys.stderr)
        return 130
    return 0
