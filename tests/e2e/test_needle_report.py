"""Needle samples out of lm-eval results (length, depth, RULER's score under either metric name), the
per-(length, depth) cells and their markdown table, and the heatmap PNGs."""

from __future__ import annotations

from evals.compare import NEEDLE_METRIC, samples_of
from evals.needle_report import cells_markdown, needle_cells, write_heatmap


def entry(doc_id: int, doc: dict, text: str, **metrics) -> dict:
    return {"doc_id": doc_id, "doc": doc, "filter": "none", "metrics": list(metrics), "resps": [[text]],
            "filtered_resps": [text], **metrics}


def test_ruler_samples_keep_length_measured_depth_and_the_length_named_score():
    doc = {"input": "x" * 90 + " 1234567." + "y" * 100, "outputs": ["1234567"], "max_length": 8192}
    res = {"samples": {"niah_single_1": [entry(3, doc, " 1234567.", **{"4096": -1.0, "8192": 1.0})]}}
    (key, rec), = samples_of("niah_single_1", res).items()
    assert key == "niah_single_1/8192/3"
    assert rec["length"] == 8192 and rec["scores"] == {NEEDLE_METRIC: 1.0} and rec["text"] == " 1234567."
    assert rec["depth"] == 100 * 91 / len(doc["input"])


def test_niah_restated_samples_keep_the_requested_depth():
    doc = {"input": "...", "outputs": ["7654321"], "max_length": 2048, "depth": 25}
    res = {"samples": {"niah_restated": [entry(0, doc, " 1.", string_match_all=0.0)]}}
    rec = samples_of("niah_restated", res)["niah_restated/2048/0"]
    assert (rec["length"], rec["depth"], rec["scores"]) == (2048, 25, {NEEDLE_METRIC: 0.0})


def rec(length, depth, score, text):
    return {"length": length, "depth": depth, "scores": {NEEDLE_METRIC: score}, "text": text, "answers": {"none": text}}


def test_cells_bin_to_the_nearest_depth_and_count_both_sides():
    reference = {"a": rec(1024, 3.0, 1.0, "x"), "b": rec(1024, 10.0, 0.0, "y"), "c": rec(1024, 97.5, 1.0, "z"),
                 "d": rec(4096, 52.0, 1.0, "w")}
    deployed = {**reference, "b": rec(1024, 10.0, 1.0, "x"), "d": rec(4096, 52.0, 0.0, "v")}
    cells = needle_cells("niah_single_1", deployed, reference, [0, 50, 100])
    assert cells == [
        {"length": 1024, "depth": 0, "n": 2, "deployed": 100.0, "reference": 50.0, "agreement": 50.0},
        {"length": 1024, "depth": 100, "n": 1, "deployed": 100.0, "reference": 100.0, "agreement": 100.0},
        {"length": 4096, "depth": 50, "n": 1, "deployed": 0.0, "reference": 100.0, "agreement": 0.0}]
    table = cells_markdown("niah_single_1", cells)
    assert table[2] == "| length | depth % | n | deployed | reference | agreement |"
    assert table[4] == "| 1024 | 0 | 2 | 100.0 | 50.0 | 50.0% |" and len(table) == 4 + len(cells)


def test_heatmap_is_a_png_per_side(tmp_path):
    cells = [{"length": n, "depth": d, "n": 1, "deployed": 100.0 * (d < 50), "reference": 100.0, "agreement": 0.0}
             for n in (2048, 1048576) for d in (0, 25, 50, 75, 100)]
    for side in ("deployed", "reference"):
        path = tmp_path / f"niah_restated-{side}.png"
        write_heatmap(cells, side, str(path), f"niah_restated: {side}, tiny, float32")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
