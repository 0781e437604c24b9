"""The ``helix`` command: the runtime's subcommands (helix/cli.py) and ``eval``, the accuracy suite (evals/run.py).

The suite imports the runtime, never the reverse, so the command that has both is assembled here, above both.
``python -m evals`` is the same command without installing the project (``python -m helix`` has the runtime's
subcommands only).
"""

from __future__ import annotations

import argparse

from helix import cli


def add_eval(sub) -> None:
    from evals import run as eval_run  # lm-eval is imported only when the subcommand runs

    p = sub.add_parser("eval", help="MMLU / GSM8K / needle tasks on the Helix deployment vs the single-device reference",
                       description=eval_run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_run.add_arguments(p)
    p.set_defaults(func=eval_run.main)


COMMANDS = (*cli.COMMANDS[:2], add_eval, *cli.COMMANDS[2:])  # generate, make-checkpoint, eval, serve, ...


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, COMMANDS)
