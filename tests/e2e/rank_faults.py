"""Known Helix bugs planted inside a running cluster's generation ranks (module-level functions, so the spawned
ranks can import them); the faults themselves are tests/helix_harness.py's. No switch in product code."""

from __future__ import annotations

from tests.helix_harness import planted


def plant(ctx, fault: str, n: int, tokens_per_block: int) -> None:
    """Enter ``planted(fault)`` on this rank and keep it entered across the cluster's later commands."""
    patch = planted(fault, n, tokens_per_block)
    patch.__enter__()
    ctx.state["planted_fault"] = patch


def unplant(ctx) -> None:
    ctx.state.pop("planted_fault").__exit__(None, None, None)
