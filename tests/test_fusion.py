"""helix/fusion.py: the decode step's elementwise chains go through torch.compile on CUDA only; everywhere else the
plain function runs, and the compiler is never loaded (importing it costs a CPU process, and each of its rank
processes, ~4 s on a 2-core host)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_on_cpu_the_plain_function_runs_and_the_compiler_is_never_imported():
    code = ("import sys, torch; from helix.fusion import fused_on_cuda; "
            "f = fused_on_cuda(lambda x, y: x * y + 1, True); "
            "assert f(torch.full((3,), 2.0), torch.full((3,), 3.0)).tolist() == [7.0] * 3; "
            "assert 'torch._dynamo' not in sys.modules, 'torch.compile was loaded for CPU tensors'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
