"""`helix serve` as a command: it serves, then a rank fails while requests wait (every one gets a 503 within
seconds, the command exits 1 naming the rank, no process left); bad flags are refused in one line before
anything starts."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.disagg.test_disagg_cli import FAULT_SITE
from tests.model.test_worker_failure import survivors


def start(tiny_checkpoint, pid_dir: Path, *flags: str, **env) -> tuple[subprocess.Popen, str]:
    """`helix serve` on the tiny checkpoint and a free port; returns the process and its base URL once it is up."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAULT_SITE), os.environ.get("PYTHONPATH", "")]),
               HELIX_TEST_PID_DIR=str(pid_dir), **env)
    proc = subprocess.Popen([sys.executable, "-m", "helix", "serve", "--model", str(tiny_checkpoint), "--cp", "2",
                             "--tokens-per-block", "4", "--max-tokens", "256", "--port", "0", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    line = lines.get(timeout=120)  # "helix serve: http://127.0.0.1:PORT/v1 serves model ...": the ranks are up
    return proc, line.split()[2].removesuffix("/v1")


def test_failed_rank_gives_503_to_every_waiting_request_and_ends_the_command(tiny_checkpoint, reference, tmp_path):
    prompt = [256, 7]
    assert 257 not in reference.generate(prompt, 20), "the requests must still be decoding at step 3 (no EOS)"
    pids = tmp_path / "pids"
    pids.mkdir()
    proc, url = start(tiny_checkpoint, pids, HELIX_TEST_FAULT_RANK="1")  # generation rank 1 raises in step 3

    def complete(max_tokens: int) -> requests.Response:
        return requests.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                            "temperature": 0}, timeout=60)

    first = complete(2)  # decode steps 1 and 2: served
    assert first.status_code == 200 and first.json()["choices"][0]["finish_reason"] == "length", first.text
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(complete, [20] * 4))
    failed_at = float((tmp_path / "failed_at").read_text())
    answered = time.time()
    for r in answers:
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "service_unavailable"
        assert "generation server rank 1 (world rank 2) failed" in error["message"], error
    assert answered - failed_at < 30, f"answered {answered - failed_at:.1f} s after the failure"
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "helix: error: generation server rank 1 (world rank 2) failed" in err and "planted failure" in err, err
    assert not survivors(pids)


def test_bad_flags_are_refused_in_one_line(tiny_checkpoint, capsys):
    from helix.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cases = {("--config", "deploy.yaml", "--model", str(tiny_checkpoint)):
             "--config='deploy.yaml': the deployment file names the model; drop --model",
             ("--model", str(tiny_checkpoint), "--port", str(port)):
             f"--host='127.0.0.1' --port={port}: cannot listen there (Address already in use)",
             ("--model", str(tiny_checkpoint), "--cp", "1"): "generation_servers.context_parallel_size=1"}
    for flags, message in cases.items():
        assert main(["serve", *flags]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("helix: error: ") and message in err, err
    taken.close()
