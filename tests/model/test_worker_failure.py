"""A rank that raises or dies surfaces in the driver within seconds, named, with its traceback; no process
outlives the pool or the command."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helix.workers import RankPool, WorkerError


def _raise_on_rank1(ctx):
    if ctx.rank == 1:
        raise ValueError("boom from rank 1")
    return ctx.rank


def _die_on_rank2(ctx):
    if ctx.rank == 2:
        os._exit(3)
    import time as t
    t.sleep(30)  # the others would wait; the driver must not


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def survivors(pid_dir: Path, within_s: float = 5.0) -> list[int]:
    """The recorded pids still running ``within_s`` after the command ended (the fork server its ranks came from
    exits once it sees the command gone, a moment later)."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p in map(int, os.listdir(pid_dir)) if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_raising_rank_is_named_with_traceback_and_pool_is_torn_down():
    pool = RankPool(3)
    procs = list(pool.procs)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 failed") as info:
        pool.run(_raise_on_rank1)
    assert "ValueError: boom from rank 1" in str(info.value) and "Traceback" in str(info.value)
    assert info.value.rank == 1
    assert time.monotonic() - t0 < 15
    assert not any(p.is_alive() for p in procs)


def test_dead_rank_is_named_within_seconds():
    pool = RankPool(3)
    procs = list(pool.procs)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 2 failed:\nprocess exited with code 3"):
        pool.run(_die_on_rank2)
    assert time.monotonic() - t0 < 15
    assert not any(p.is_alive() for p in procs)


def test_helix_generate_exits_nonzero_naming_the_rank(tiny_checkpoint, tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "fault_site"),
                                                       os.environ.get("PYTHONPATH", "")]),
               HELIX_TEST_FAULT_RANK="1", HELIX_TEST_PID_DIR=str(pid_dir))
    proc = subprocess.run([sys.executable, "-m", "helix", "generate", "--model", str(tiny_checkpoint), "--backend",
                           "helix", "--cp", "2", "--tokens-per-block", "4", "--prompt-ids", "1,2,3,4,5",
                           "--max-new-tokens", "8"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "rank 1 failed" in proc.stderr and "planted failure in decode step 3" in proc.stderr, proc.stderr
    assert "Traceback" in proc.stderr
    reaction = time.time() - float((tmp_path / "failed_at").read_text())
    assert reaction < 30, f"the command ended {reaction:.1f} s after the failure"
    assert len(os.listdir(pid_dir)) >= 4  # the command, the fork server and its two ranks
    assert not survivors(pid_dir), "processes outlived the command"
