"""Faults as accuracy: each known Helix bug planted in the generation ranks of a disaggregated deployment
(context 1 + Helix CP 2, float32, 32-token blocks) is measured as needle accuracy on the constructed retrieval
checkpoint, whose clean accuracy is 100% by construction (helix/needle.py).

Measured on 10 prompts of ~700-800 tokens (needle depths 0-100%, two keys of different lengths, so the prompts
end at different offsets inside a block):

| fault | accuracy | why |
|---|---|---|
| none | 100% | |
| drop_shard (the last rank's partial never reaches the combine) | 30% | a prompt survives only when the needle and the newest tokens (the previous-token heads' targets) all sit on the surviving rank |
| uniform_combine (partials averaged, lse ignored) | 0% | every head mixes the right position's value with the other rank's best guess |
| local_rope (each rank rotates by the token's index in its own shard) | 0% | the previous-token heads find the wrong offsets |
| wrong_owner (decode writes go to rank (b + 1) mod N) | 50% | the generated tokens' KV is lost or lands on a stale slot; which answers read a lost token depends on where the prompt ends inside its block: here one key of the two fails at every depth |
| base2_lse (lse / ln 2 fed to the natural-log combine) | 100% | blind spot: it only sharpens the cross-rank weights, and every head of this model already puts > 1 - 1e-5 of its weight on one position (margins >= 27 nats), so no decision moves. The MLA-module parity check catches it (tests/model/test_planted_bugs.py) |
"""

from __future__ import annotations

import pytest

from evals.backends import BackendSpec
from helix.disagg import launch
from helix.sampling import SamplingParams
from tests.e2e import rank_faults
from tests.model.test_needle_checkpoint import VALUE, needle_prompt

CP, TPB = 2, 32
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEYS = ("hungry-elephant", "bold-sunset-over-the-bay")  # 15 and 24 bytes: the prompts end 9 bytes apart


@pytest.fixture(scope="module")
def cluster(needle_checkpoint):
    c = launch(BackendSpec(model=str(needle_checkpoint), cp=CP, tokens_per_block=TPB).run_spec())
    yield c
    c.shutdown()


def accuracy(cluster, fault: str | None) -> float:
    """Share of prompts whose generated text holds the needle's value, with ``fault`` planted in the ranks."""
    prompts = [cluster.tokenizer(needle_prompt(6, d, k)).input_ids for d in DEPTHS for k in KEYS]
    ranks = cluster.dep.generation_ranks
    if fault:
        cluster.on_ranks(rank_faults.plant, fault, CP, TPB, ranks=ranks)
    try:
        outs = cluster.generate(prompts, SamplingParams(max_new_tokens=10))
    finally:
        if fault:
            cluster.on_ranks(rank_faults.unplant, ranks=ranks)
    return sum(VALUE in cluster.tokenizer.decode(o) for o in outs) / len(prompts)


@pytest.mark.parametrize("fault, at_most", [(None, 1.0), ("drop_shard", 0.4), ("uniform_combine", 0.1),
                                            ("local_rope", 0.1), ("wrong_owner", 0.6)])
def test_planted_fault_costs_needle_accuracy(cluster, fault, at_most):
    got = accuracy(cluster, fault)
    print(f"fault={fault}: needle accuracy {100 * got:.0f}%")
    if fault is None:
        assert got == 1.0
    else:
        assert got <= at_most, f"fault={fault}: needle accuracy {100 * got:.0f}% > {100 * at_most:.0f}%"


def test_base2_lse_is_invisible_to_sharp_retrieval(cluster):
    """The documented blind spot (see the module docstring): accuracy stays 100%."""
    assert accuracy(cluster, "base2_lse") == 1.0
