"""lm-eval's own command line, with the ``helix`` model registered and the project's tasks wired in.

lm-eval 0.4.13 discovers models only through its built-in table and ``@register_model`` at import time (no
entry-point group), so ``lm-eval --model helix`` alone cannot find it. This module imports the adapter and
then runs lm-eval's unchanged CLI::

    python -m evals.lm_eval_cli --model helix \\
        --model_args pretrained=DIR,backend=reference,max_length=1024 --tasks mmlu --num_fewshot 5 --limit 2
    python -m evals.lm_eval_cli --model helix --model_args pretrained=DIR,backend=helix,max_length=2048 \\
        --tasks niah_single_1,niah_restated --metadata '{"max_seq_lengths": [2048]}' --limit 2

It adds an ``--include_path`` with the task files of evals/task_data.py (``niah_restated`` among them) and lets
lm-eval's RULER generator import offline. ``--data-dir DIR`` (or ``$HELIX_EVAL_DATA``) makes ``mmlu`` and
``gsm8k`` read the local copies offline; without either they read the Hugging Face hub as usual.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    from evals.task_data import go_offline, resolve_data_dir, ruler_offline, task_dir

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data-dir")
    ours, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    data_dir = resolve_data_dir(ours.data_dir)
    if data_dir is not None:
        go_offline()  # before lm_eval imports datasets
    ruler_offline()

    import evals.lm_eval_adapter  # noqa: F401  registers the "helix" model
    from lm_eval.__main__ import cli_evaluate

    with task_dir(data_dir) as path:
        # Later include paths override lm-eval's built-in tasks of the same name.
        sys.argv = [sys.argv[0], *rest, "--include_path", path]
        cli_evaluate()


if __name__ == "__main__":
    main()
