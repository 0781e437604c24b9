"""`python -m evals` is the `helix` command (evals/cli.py), without installing the project."""

from evals.cli import main

raise SystemExit(main())
