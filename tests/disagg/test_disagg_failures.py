"""A worker that dies or raises, on either side, makes the driver raise within 30 s naming the server and rank
(with the traceback when there is one), and no rank process survives. Faults are planted by monkeypatching
inside the rank processes; the product code has no fault switches."""

import os
import signal
import time

import pytest

from helix.disagg import launch
from helix.sampling import SamplingParams
from helix.workers import WorkerError
from tests.disagg.conftest import deployment


def _plant_context_fault(ctx, how: str) -> None:
    """The context server fails while prefilling the second request (the first is already decoding)."""
    from helix.disagg.context_server import ContextServer

    prefill, seen = ContextServer.prefill, []

    def failing(self, req):
        seen.append(req.req_id)
        if len(seen) == 2:
            if how == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("planted context-server failure")
        return prefill(self, req)

    ContextServer.prefill = failing


def _plant_generation_death(ctx) -> None:
    """This generation rank's process exits in its fourth decode step."""
    from helix.engine import HelixEngine

    step = HelixEngine.step

    def dying(self):
        if self.steps == 3:
            os._exit(7)
        return step(self)

    HelixEngine.step = dying


CASES = {
    "context server killed": (0, lambda: (_plant_context_fault, "die"),
                              "context server rank 0 (world rank 0) failed:\nprocess exited with code -9"),
    "context server raises": (0, lambda: (_plant_context_fault, "raise"),
                              "context server rank 0 (world rank 0) failed:\nTraceback"),
    "generation rank killed": (2, lambda: (_plant_generation_death,),
                               "generation server rank 1 (world rank 2) failed:\nprocess exited with code 7"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_failed_worker_is_named_and_nothing_survives(tiny_checkpoint, case):
    rank, plant, message = CASES[case]
    cluster = launch(deployment(tiny_checkpoint, n=2))
    procs = list(cluster.pool.procs)
    fn, *args = plant()
    cluster.on_ranks(fn, *args, ranks=[rank])
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        cluster.generate([[5, 6, 7, 8, 9], list(range(20, 50))], SamplingParams(max_new_tokens=20))
    elapsed = time.monotonic() - t0
    assert message in str(info.value), str(info.value)
    if "raises" in case:
        assert "RuntimeError: planted context-server failure" in str(info.value)
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="shut down"):
        cluster.generate([[1, 2]], SamplingParams(max_new_tokens=2))
