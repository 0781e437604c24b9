"""`python -m helix` is the `helix` command."""

from helix.cli import main

raise SystemExit(main())
