"""Loaded at start-up by every Python process of a test that puts this folder on PYTHONPATH (the `helix`
command and the fork server its ranks are forked from, helix.workers.rank_processes; a fork inherits the patch). With HELIX_TEST_FAULT_RANK=r set, rank r raises in its third decode step;
each process records its pid in HELIX_TEST_PID_DIR so the test can check that none outlives the command, and the
failing rank writes the time it raised to HELIX_TEST_PID_DIR/../failed_at, from which the test times the command's
reaction (start-up time under a loaded CI machine is not what is being measured)."""

import os
import time

if os.environ.get("HELIX_TEST_PID_DIR"):
    def _record_pid():
        open(os.path.join(os.environ["HELIX_TEST_PID_DIR"], str(os.getpid())), "w").close()

    _record_pid()
    os.register_at_fork(after_in_child=_record_pid)  # the ranks, forked from the fork server

if os.environ.get("HELIX_TEST_FAULT_RANK"):
    import helix.engine

    _step = helix.engine.HelixEngine.step

    def _failing_step(self):
        if self.model.mapping.rank == int(os.environ["HELIX_TEST_FAULT_RANK"]) and self.steps == 2:
            with open(os.path.join(os.environ["HELIX_TEST_PID_DIR"], os.pardir, "failed_at"), "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError("planted failure in decode step 3")
        return _step(self)

    helix.engine.HelixEngine.step = _failing_step
