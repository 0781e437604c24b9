"""`helix bench-serve`: requests/s and latency of `helix serve` under concurrent clients (docs/design.md §5.4).

One run starts the deployment behind the HTTP server on a loopback port and sends the same seeded workload
twice, through real HTTP requests:

* ``1 client``: one request at a time, so the decode batch never holds more than one request (the baseline);
* ``K clients``: K threads sending at once, so requests join the running decode batch (continuous batching).

Workload: greedy completions with prompts of 16..``max_prompt`` random byte tokens and 8..``max_new`` new tokens
(an EOS ends one earlier: completion tokens are counted from the responses). Per pass: requests/s, completion tokens/s and the p50 / p99 of per-request latency
(send to last byte). Written as JSON and markdown to ``out``, named after the machine.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

from helix.disagg import launch
from helix.disagg.deploy import load_deployment
from helix.serve.server import HelixServer, bind, served_model


def machine() -> str:
    """The CPU model and core count, or the GPUs the deployment uses."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores"


def workload(n: int, max_prompt: int, max_new: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(32, 127) for _ in range(rng.randint(16, max_prompt))], rng.randint(8, max_new))
            for _ in range(n)]


def run_pass(url: str, jobs: list[tuple[list[int], int]], clients: int) -> dict:
    local = threading.local()

    def send(job):
        prompt, n = job
        if not hasattr(local, "session"):  # one keep-alive connection per client thread
            local.session = requests.Session()
        t0 = time.perf_counter()
        r = local.session.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0},
                         timeout=3600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(send, jobs))
    wall = time.perf_counter() - start
    latency = sorted(s for s, _ in done)
    return {"clients": clients, "requests": len(jobs), "seconds": wall, "requests_per_s": len(jobs) / wall,
            "completion_tokens_per_s": sum(t for _, t in done) / wall,
            "latency_p50_s": statistics.median(latency),
            "latency_p99_s": latency[min(len(latency) - 1, round(0.99 * (len(latency) - 1)))]}


def run_bench_serve(config, out_dir: str, requests_n: int = 64, clients: int = 8, max_prompt: int = 256,
                    max_new: int = 32) -> dict:
    dep = load_deployment(config)
    jobs = workload(requests_n, max_prompt, max_new)
    with launch(dep) as cluster:
        server = HelixServer(cluster, served_model(cluster), bind("127.0.0.1", 0))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            run_pass(server.url, jobs[:clients], clients)  # warm-up: first-touch allocations, connections
            passes = [run_pass(server.url, jobs, 1), run_pass(server.url, jobs, clients)]
        finally:
            server.stop()
            thread.join()
    result = {"machine": machine() if dep.device == "cpu" else torch.cuda.get_device_name(0),
              "load_average_1min": os.getloadavg()[0],  # a shared host: what else ran meanwhile
              "model": os.path.basename(os.path.normpath(dep.model)), "dtype": dep.dtype, "device": dep.device,
              "context_parallel_size": dep.generation.context_parallel_size,
              "max_batch_size": dep.generation.max_batch_size, "max_prompt": max_prompt, "max_new": max_new,
              "passes": passes}
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"serve-{dep.device}-cp{dep.generation.context_parallel_size}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# helix serve load: {result['machine']}", "",
             f"`{result['model']}` in {result['dtype']} on {result['device']}, context server 1 + "
             f"Helix generation server N={result['context_parallel_size']}, max_batch_size {result['max_batch_size']}; "
             f"{result['passes'][0]['requests']} greedy requests, prompts 16..{result['max_prompt']} tokens, "
             f"8..{result['max_new']} new tokens, over HTTP on loopback. Host load average "
             f"{result['load_average_1min']:.1f} at the end (other work shared the cores: compare the two rows, "
             "measured in the same run, more than either with another run).", "",
             "| clients | requests/s | completion tokens/s | p50 latency s | p99 latency s | wall s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for p in result["passes"]:
        lines.append(f"| {p['clients']} | {p['requests_per_s']:.2f} | {p['completion_tokens_per_s']:.1f} | "
                     f"{p['latency_p50_s']:.2f} | {p['latency_p99_s']:.2f} | {p['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
