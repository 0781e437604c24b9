"""``niah_restated``: RULER's niah_single_1 with the needle at chosen depths and an answer prefix that restates
the needle's opening. The lm-eval task is evals/tasks/niah_restated.yaml; this module builds its samples.

Everything but the answer prefix and the needle's position is lm-eval's RULER generator
(lm_eval/tasks/ruler/prepare_niah.py, niah_utils.py): the ``repeat`` haystack (its sentences joined by "\\n"), a
``words`` key, a 7-digit ``numbers`` value, the needle ``prepare_niah.NEEDLE`` ("One of the special magic numbers
for {key} is: {value}."), and ``niah_utils.TEMPLATE`` worded for one needle as ``generate_input_output`` words it.

Why the prefix differs: RULER's "The special magic number for {key} mentioned in the provided text is" is
answered only by a model that retrieves. "One of the special magic numbers for {key} is:" is the needle's own
opening, so a model that continues the prompt with what followed its last bytes where they occurred before (an
induction head; the ``deepseek-v3-needle`` checkpoint is built to be one) answers " 1234567." at every length
and depth, and any loss through Helix is a Helix defect.

Samples: per length in ``max_seq_lengths``, per depth in ``depths`` (percent) and ``samples_per_depth`` times,
the needle goes in at sentence index round(depth / 100 * number of haystack sentences). The haystack is as long
as RULER's rule allows: prompt tokens (lm-eval's prompt: input, delimiter and answer prefix, counted with the
checkpoint's tokenizer) + ``tokens_to_generate`` <= the length. Each sample draws its key and value from a seed
of its own (length, depth, index), so a sample does not depend on which other lengths or depths are asked.
"""

from __future__ import annotations

import random

from helix.config import ConfigError

DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
TYPE_NEEDLE_K, TYPE_NEEDLE_V = "words", "numbers"


def single_needle_template(template: str) -> str:
    """``template`` worded for one needle and one query, as prepare_niah.generate_input_output words it (it does
    this inline, so it cannot be called for it)."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        template = template.replace(old, new)
    return template


def answer_prefix(needle: str, key: str) -> str:
    """The needle's words up to its value: "One of the special magic numbers for {key} is:"."""
    return needle.partition(" {value}")[0].format(type_needle_v=TYPE_NEEDLE_V, key=key)


class Sampler:
    """Builds the samples of one tokenizer; the haystack's per-sentence token cost is measured once."""

    def __init__(self, tokenizer, target_delimiter: str, tokens_to_generate: int):
        from lm_eval.tasks.ruler import niah_utils, prepare_niah

        self.niah = prepare_niah
        self.template = single_needle_template(niah_utils.TEMPLATE)
        self.sentence = prepare_niah.get_haystack(type_haystack="repeat")
        self.tokenizer, self.delimiter, self.generate = tokenizer, target_delimiter, tokens_to_generate
        # Tokens one more sentence adds (with its "\n"): exact for a byte-level tokenizer, close for BPE, where the
        # fit below checks the whole prompt once and corrects.
        self.per_sentence = self.count(self.sentence + "\n") - self.count("")

    def count(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def prompt(self, needle: str, key: str, sentences: int, depth: int) -> tuple[str, str]:
        """(input, answer prefix) with ``sentences`` haystack sentences and the needle at ``depth`` percent."""
        context = [self.sentence] * sentences
        context.insert(round(depth / 100 * sentences), needle)
        text = self.template.format(type_needle_v=TYPE_NEEDLE_V[:-1], context="\n".join(context), query=key)
        return text, answer_prefix(self.niah.NEEDLE, key)

    def sample(self, length: int, depth: int, index: int) -> dict:
        random.seed(f"niah_restated {length} {depth} {index}")  # prepare_niah draws from the global generator
        key, value = self.niah.generate_random(TYPE_NEEDLE_K), self.niah.generate_random(TYPE_NEEDLE_V)
        needle = self.niah.NEEDLE.format(type_needle_v=TYPE_NEEDLE_V, key=key, value=value)
        budget = length - self.generate

        def tokens(n: int) -> int:
            text, prefix = self.prompt(needle, key, n, depth)
            return self.count(text + self.delimiter + prefix)

        fixed = tokens(0)
        if fixed > budget:
            raise ConfigError(f"max_seq_lengths={length}: too short for niah_restated: its prompt without haystack is "
                              f"{fixed} tokens, plus {self.generate} generated")
        n = (budget - fixed) // self.per_sentence
        while (used := tokens(n)) > budget:  # only where tokens do not add up (BPE merges across sentences)
            n = max(0, n - -(-(used - budget) // self.per_sentence))
        text, prefix = self.prompt(needle, key, n, depth)
        return {"index": index, "input": text, "outputs": [value], "length": used + self.generate,
                "max_length": length, "depth": depth, "gen_prefix": prefix}


def niah_restated(max_seq_lengths=None, depths=DEFAULT_DEPTHS, samples_per_depth: int = 1, *,
                  target_delimiter: str, tokens_to_generate: int, **metadata):
    """lm-eval ``custom_dataset``: ``{"test": Dataset}`` ordered by length, depth, index. ``metadata`` holds the
    tokenizer's name (``tokenizer`` or ``pretrained``), read as RULER's own tasks read it."""
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name
    from lm_eval.tasks.ruler.niah_utils import download_dataset

    sampler = Sampler(get_tokenizer(resolve_tokenizer_name(metadata)), target_delimiter, int(tokens_to_generate))
    return download_dataset([sampler.sample(int(length), int(depth), i) for depth in depths
                             for i in range(int(samples_per_depth))] for length in max_seq_lengths or DEFAULT_SEQ_LENGTHS)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """RULER's score of one output: string_match_all (each expected value is a substring) after its clean-up."""
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    return {"string_match_all": string_match_all(postprocess_pred(results), [doc["outputs"]])}
