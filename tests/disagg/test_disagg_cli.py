"""`helix generate --config DEPLOY`: the same JSON as the reference backend; a failing rank ends the command
within 30 s naming the server, rank and traceback; Ctrl-C ends it with one line and exit status 130, leaving no
process behind. Every Python process of a command records its pid (tests/model/fault_site), so the tests can
check that none outlives it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.disagg.conftest import deployment
from tests.model.test_worker_failure import survivors

FAULT_SITE = Path(__file__).parents[1] / "model" / "fault_site"


def _helix(args: list[str], pid_dir: Path, **env) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAULT_SITE), os.environ.get("PYTHONPATH", "")]),
               HELIX_TEST_PID_DIR=str(pid_dir), **env)
    return subprocess.Popen([sys.executable, "-m", "helix", "generate", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps(raw))
    return path


def test_generate_with_config_matches_reference_backend(tiny_checkpoint, tmp_path):
    config = _write(tmp_path, deployment(tiny_checkpoint, n=2))
    flags = ["--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11", "--max-new-tokens", "8", "--json"]
    pids = tmp_path / "pids"
    pids.mkdir()
    disagg = _helix(["--config", str(config), *flags], pids)
    ref = subprocess.run([sys.executable, "-m", "helix", "generate", "--model", str(tiny_checkpoint), *flags],
                         capture_output=True, text=True, timeout=120)
    out, err = disagg.communicate(timeout=120)
    assert disagg.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == json.loads(ref.stdout.splitlines()[-1])
    assert len(os.listdir(pids)) >= 5 and not survivors(pids)  # the command, the fork server, 3 ranks


def test_wrong_config_is_refused_with_how_to_fix(tiny_checkpoint, tmp_path):
    raw = deployment(tiny_checkpoint, n=2)
    raw["generation_servers"]["kv_cache_config"]["tokens_per_block"] = 8
    config = _write(tmp_path, raw)
    proc = subprocess.run([sys.executable, "-m", "helix", "generate", "--config", str(config), "--prompt-ids", "1,2",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"helix: error: {config}: generation_servers.kv_cache_config.tokens_per_block=8: "
                                   "must equal cp_config.tokens_per_block=4: Helix ownership is decided per KV-cache block")


def test_failing_generation_rank_ends_the_command_naming_it(tiny_checkpoint, tmp_path):
    config = _write(tmp_path, deployment(tiny_checkpoint, n=2))
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _helix(["--config", str(config), "--prompt-ids", "1,2,3,4,5,6", "--max-new-tokens", "8"], pids,
                  HELIX_TEST_FAULT_RANK="1")  # generation rank 1 raises in its third decode step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "generation server rank 1 (world rank 2) failed" in err and "planted failure in decode step 3" in err, err
    assert "Traceback" in err
    reaction = time.time() - float((tmp_path / "failed_at").read_text())
    assert reaction < 30, f"the command ended {reaction:.1f} s after the failure"
    assert not survivors(pids)


def test_ctrl_c_leaves_no_processes(tiny_checkpoint, tmp_path):
    config = _write(tmp_path, deployment(tiny_checkpoint, n=2, max_tokens=8192))
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _helix(["--config", str(config), "--prompt-ids", "1,2,3", "--max-new-tokens", "8000"], pids)
    deadline = time.monotonic() + 60
    while len(os.listdir(pids)) < 5 and time.monotonic() < deadline:  # the command, fork server, 3 ranks
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    # One line (after the INFO lines of the start), from the command alone: the ranks ignore SIGINT.
    assert [line for line in err.splitlines() if not line.startswith("INFO ")] == ["helix: interrupted"], err
    assert len(os.listdir(pids)) >= 5 and not survivors(pids)
