"""The project's needle task ``niah_restated``: RULER's niah_single_1 sample with the needle at the requested depth,
sized to RULER's rule with the checkpoint's tokenizer, the answer prefix restating the needle, deterministic."""

from __future__ import annotations

import random

import pytest

from evals.task_data import ruler_offline

LENGTHS, DEPTHS = (1024, 2048), (0, 25, 50, 75, 100)
GENERATE = 16


@pytest.fixture(scope="module")
def niah():
    ruler_offline()
    from evals import niah_restated

    return niah_restated


@pytest.fixture(scope="module")
def docs(niah, byte_tokenizer_dir):
    return list(niah.niah_restated(list(LENGTHS), list(DEPTHS), 2, target_delimiter=" ", tokens_to_generate=GENERATE,
                                   tokenizer=byte_tokenizer_dir)["test"])


def lines(doc: dict) -> list[str]:
    """The haystack sentences and the needle, in order (the template's first and last lines dropped)."""
    return doc["input"].split("\n")[1:-1]


def test_needle_sits_at_the_requested_sentence_index(docs):
    assert [(d["max_length"], d["depth"]) for d in docs] == [(n, d) for n in LENGTHS for d in DEPTHS for _ in range(2)]
    for doc in docs:
        context = lines(doc)
        needle = [i for i, line in enumerate(context) if line.startswith("One of the special magic numbers for ")]
        haystack = len(context) - 1
        assert needle == [round(doc["depth"] / 100 * haystack)], (doc["depth"], haystack, needle)
        assert context[needle[0]].endswith(f" is: {doc['outputs'][0]}.") and len(doc["outputs"][0]) == 7


def test_prompt_and_generation_fill_the_length_as_ruler_sizes_it(docs, byte_tokenizer_dir):
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    tok = get_tokenizer(byte_tokenizer_dir)
    sentence = len(tok(lines(docs[0])[-1] + "\n", add_special_tokens=False).input_ids)
    for doc in docs:
        used = len(tok(doc["input"] + " " + doc["gen_prefix"]).input_ids)  # lm-eval's prompt, BOS included
        assert used + GENERATE == doc["length"] <= doc["max_length"]
        assert doc["max_length"] - doc["length"] < sentence  # one more sentence would not fit


def test_answer_prefix_restates_the_needle_and_the_template_is_rulers(docs):
    from lm_eval.tasks.ruler import niah_utils, prepare_niah

    doc = docs[0]
    key = doc["gen_prefix"][len("One of the special magic numbers for "):-len(" is:")]
    assert doc["gen_prefix"] == f"One of the special magic numbers for {key} is:"
    assert f"\n{doc['gen_prefix']} {doc['outputs'][0]}.\n" in doc["input"]
    # RULER's own single-needle wording of the same template, around the context.
    random.seed(0)
    text, _, query = prepare_niah.generate_input_output(
        3, prepare_niah.get_haystack("repeat"), type_haystack="repeat", num_needle_k=1, type_needle_k="words",
        num_needle_v=1, type_needle_v="numbers", template=niah_utils.TEMPLATE)
    ruler = text.split("\n")
    ours = doc["input"].split("\n")
    assert ours[0] == ruler[0] and ours[-1] == ruler[-1].replace(query, key)
    assert ours[1:-1].count(prepare_niah.get_haystack("repeat")) == len(ours) - 3


def test_samples_are_deterministic_and_independent_of_the_other_cells(docs, niah, byte_tokenizer_dir):
    again = list(niah.niah_restated([2048], [50], 2, target_delimiter=" ", tokens_to_generate=GENERATE,
                                    tokenizer=byte_tokenizer_dir)["test"])
    assert again == [d for d in docs if (d["max_length"], d["depth"]) == (2048, 50)]
    assert len({d["outputs"][0] for d in docs}) == len(docs)  # each sample its own key and value


class MergingTokenizer:
    """Bytes, plus one token for each sentence boundary: a sentence measured alone costs one token less than in
    the haystack, as when a BPE tokenizer splits differently across sentences."""

    def __init__(self):
        self.calls = []

    def __call__(self, text: str):
        self.calls.append(len(text))
        return type("Encoding", (), {"input_ids": [0] * (1 + len(text.encode()) + text.count("\nThe"))})()


def test_the_fit_corrects_a_tokenizer_whose_counts_do_not_add_up(niah):
    tok = MergingTokenizer()
    sampler = niah.Sampler(tok, " ", GENERATE)
    tok.calls.clear()
    doc = sampler.sample(8192, 50, 0)
    assert doc["length"] <= 8192 and 8192 - doc["length"] < sampler.per_sentence + 1
    assert sum(n > 4096 for n in tok.calls) <= 3  # the long prompt is tokenized a few times, not once per sentence


def test_too_short_a_length_is_refused_naming_it(niah, byte_tokenizer_dir):
    from helix.config import ConfigError

    with pytest.raises(ConfigError, match="max_seq_lengths=200: too short for niah_restated"):
        niah.niah_restated([200], [50], 1, target_delimiter=" ", tokens_to_generate=GENERATE,
                           tokenizer=byte_tokenizer_dir)
