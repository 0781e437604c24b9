"""A needle task's results by (context length, needle depth): the cell table and the heatmap of each side.

A sample's depth is binned to the nearest requested depth: niah_restated's samples sit exactly at one, lm-eval's
RULER tasks place their needles themselves (evals/compare.py measures where).
"""

from __future__ import annotations

from collections import defaultdict

from evals.compare import NEEDLE_METRIC, same_prediction

SIDES = ("deployed", "reference")
# The classic needle-in-a-haystack palette: red (missed) through yellow to green (found).
PALETTE = ("#F0496E", "#EBB839", "#0CD79F")


def needle_cells(task: str, deployed: dict[str, dict], reference: dict[str, dict], depths: list[int]) -> list[dict]:
    """Per (length, depth), by length then depth: n, both accuracies and the agreement (same output), percent."""
    keys = defaultdict(list)
    for key, rec in reference.items():
        keys[rec["length"], min(depths, key=lambda d: abs(d - rec["depth"]))].append(key)
    cells = []
    for (length, depth), ks in sorted(keys.items()):
        n = len(ks)
        cells.append({"length": length, "depth": depth, "n": n,
                      **{side: 100 * sum(run[k]["scores"][NEEDLE_METRIC] for k in ks) / n
                         for side, run in zip(SIDES, (deployed, reference))},
                      "agreement": 100 * sum(same_prediction(task, deployed[k], reference[k]) for k in ks) / n})
    return cells


def cells_markdown(task: str, cells: list[dict]) -> list[str]:
    lines = [f"{task} by context length and needle depth (string_match_all, %):", "",
             "| length | depth % | n | deployed | reference | agreement |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['length']} | {c['depth']} | {c['n']} | {c['deployed']:.1f} | {c['reference']:.1f} | "
              f"{c['agreement']:.1f}% |" for c in cells]
    return lines


def write_heatmap(cells: list[dict], side: str, path: str, title: str) -> None:
    """x: needle depth, y: context length, colour and label: the side's accuracy (0-100%)."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    lengths, depths = sorted({c["length"] for c in cells}), sorted({c["depth"] for c in cells})
    grid = np.full((len(lengths), len(depths)), np.nan)
    for c in cells:
        grid[lengths.index(c["length"]), depths.index(c["depth"])] = c[side]
    fig = Figure(figsize=(2.5 + 0.9 * len(depths), 1.6 + 0.55 * len(lengths)))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap=LinearSegmentedColormap.from_list("needle", PALETTE), vmin=0, vmax=100,
                      aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.0f}%", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set(xlabel="needle depth (%)", ylabel="context length (tokens)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
