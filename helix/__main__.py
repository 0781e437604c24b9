"""`python -m helix`: the runtime's subcommands of the `helix` command (generate, make-checkpoint, bench); the
installed `helix` and `python -m evals` add `eval` (evals/cli.py)."""

from helix.cli import main

raise SystemExit(main())
