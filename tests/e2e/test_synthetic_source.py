"""``synthetic:PRESET`` as the model source (helix/sources.py): random weights drawn by each process on its own
device, no files. The disaggregated deployment and the reference must see the same weights and tokenizer."""

from __future__ import annotations

import pytest
import torch

from evals.backends import BackendSpec, HelixBackend, ReferenceBackend
from helix.config import ConfigError
from helix.disagg import launch
from helix.sampling import SamplingParams
from helix.sources import load_source_tokenizer, open_source
from tests.tolerance import assert_f32_parity

SOURCE = "synthetic:deepseek-v3-lite-tiny"


def test_helix_on_a_synthetic_source_equals_the_reference():
    ref = ReferenceBackend(SOURCE)
    prompts = [list(range(40, 77)), [ref.tokenizer.bos_token_id, 72, 105]]
    requests = [(list(range(40, 77)), [5, 6]), (list(range(40, 77)), [7, 8]), ([3, 1, 4], [1])]
    with HelixBackend(launch(BackendSpec(model=SOURCE, cp=2, tokens_per_block=4).run_spec())) as helix:
        assert helix.generate(prompts, SamplingParams(max_new_tokens=6)) == ref.generate(prompts, SamplingParams(max_new_tokens=6))
        for i, (got, want) in enumerate(zip(helix.score(requests), ref.score(requests))):
            assert_f32_parity(torch.tensor(got[0]), torch.tensor(want[0]), f"score request {i}")


def test_synthetic_tokenizer_is_the_written_byte_tokenizer(tiny_checkpoint):
    text = "Question: 2+2?\nAnswer: 4 ü"
    written, synthetic = load_source_tokenizer(tiny_checkpoint), load_source_tokenizer(SOURCE)
    assert synthetic.encode(text) == written.encode(text)
    assert (synthetic.bos_token_id, synthetic.eos_token_id) == (written.bos_token_id, written.eos_token_id)
    assert open_source(SOURCE).config.eos_token_id == synthetic.eos_token_id


def test_unknown_synthetic_preset_is_refused_before_any_process_starts():
    with pytest.raises(ConfigError, match="model.path='synthetic:deepseek-v9'.*unknown preset"):
        BackendSpec(model="synthetic:deepseek-v9", cp=2).run_spec()


def test_local_helix_run_on_a_synthetic_source_equals_the_reference(rank_pool):
    """The runner builds through the same factory as the servers, so ``synthetic:`` works there too."""
    from helix.config import HelixConfig
    from helix.engine import Request
    from helix.runner import helix_generate
    from helix.spec import RunSpec

    ref = ReferenceBackend(SOURCE)
    prompt = list(range(40, 77))
    spec = RunSpec(model=SOURCE, generation=HelixConfig(context_parallel_size=2, tokens_per_block=4, max_tokens=64,
                                                         max_batch_size=1))
    got = helix_generate(spec, [Request(0, prompt, SamplingParams(max_new_tokens=6))], rank_pool)
    assert got[0].token_ids == ref.generate([prompt], SamplingParams(max_new_tokens=6))[0]
