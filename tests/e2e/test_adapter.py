"""The lm-eval ``helix`` model on the reference backend: each request type, ordering under batching, ``until``,
``max_gen_toks``, sampling settings, model_args parsing, progress bar labels and non-finite logits."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from evals.backends import BackendSpec, ReferenceBackend
from evals.lm_eval_adapter import HelixLM, Progress
from helix.config import ConfigError, HelixConfig
from helix.disagg.deploy import deployment_dict
from helix.sampling import NonFiniteLogits, SamplingParams
from helix.spec import ContextServerConfig


class Spy:
    """A backend that records what the adapter asks of the real one."""

    def __init__(self, inner):
        self.inner, self.tokenizer = inner, inner.tokenizer
        self.score_calls, self.generate_calls = [], []

    def score(self, requests):
        self.score_calls.append(requests)
        return self.inner.score(requests)

    def generate(self, prompts, sampling):
        self.generate_calls.append((prompts, sampling))
        return self.inner.generate(prompts, sampling)

    def shutdown(self):
        pass


def req(kind, *args):
    return Instance(kind, {}, args, 0)


LL = [("Question: 2+2?\nAnswer:", " 4"), ("The sky is", " blue"), ("a", "bcdefgh"), ("Answer:", " A"),
      ("Answer:", " B"), ("", "hello"), ("x" * 40, " y")]


def test_loglikelihood_matches_reference_and_keeps_order_under_batching(reference_backend):
    model = reference_backend.model
    results = {b: HelixLM(reference_backend, max_length=256, batch_size=b).loglikelihood(
        [req("loglikelihood", *p) for p in LL]) for b in (1, 3, 64)}
    assert results[1] == results[3] == results[64]
    tok = reference_backend.tokenizer
    for (ctx, cont), (logprob, greedy) in zip(LL, results[64]):
        if ctx:  # TemplateLM moves nothing here (no trailing spaces): context and continuation encode apart
            c, x = tok.encode(ctx), tok.encode(ctx + cont)[len(tok.encode(ctx)):]
        else:  # empty context: conditioned on BOS, continuation without special tokens
            c, x = [tok.bos_token_id], tok.encode(cont, add_special_tokens=False)
        want, flags = model.score(c, x)
        assert logprob == pytest.approx(sum(want), abs=1e-9)
        assert greedy == all(flags)


def test_choices_of_one_question_share_a_forward_pass(reference_backend, monkeypatch):
    calls = []
    prefill = reference_backend.model.prefill
    monkeypatch.setattr(reference_backend.model, "prefill", lambda ids: calls.append(len(ids)) or prefill(ids))
    lm = HelixLM(reference_backend, max_length=256)
    lm.loglikelihood([req("loglikelihood", "Answer:", c) for c in (" A", " B", " C", " D")])
    assert len(calls) == 1


def test_loglikelihood_truncates_context_from_the_left(reference_backend):
    spy = Spy(reference_backend)
    HelixLM(spy, max_length=16).loglikelihood([req("loglikelihood", "z" * 100, " end")])
    (ctx, cont), = spy.score_calls[0]
    assert len(ctx) + len(cont) - 1 == 16 and cont == list(b" end")


def test_loglikelihood_rolling_scores_every_token_once_within_max_length(reference_backend):
    text = "The rolling windows cover this sentence exactly once."
    spy = Spy(reference_backend)
    lm = HelixLM(spy, max_length=16, batch_size=4)
    total, = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    windows = [w for call in spy.score_calls for w in call]
    assert sum(len(cont) for _, cont in windows) == len(text.encode())
    assert all(len(ctx) + len(cont) - 1 <= 16 for ctx, cont in windows)
    assert total == pytest.approx(sum(sum(lp) for lp, _ in reference_backend.score(windows)), abs=1e-9)
    # Shorter than max_length: one window, the whole text conditioned on BOS.
    short, = HelixLM(reference_backend, max_length=256).loglikelihood_rolling([req("loglikelihood_rolling", text)])
    want, _ = reference_backend.model.score([reference_backend.tokenizer.bos_token_id], list(text.encode()))
    assert short == pytest.approx(sum(want), abs=1e-9)


def test_generate_until_greedy_matches_reference_and_honours_max_gen_toks(reference_backend):
    spy = Spy(reference_backend)
    lm = HelixLM(spy, max_length=256, batch_size=2)
    prompts = ["Question: what is 3+4?\nAnswer:", "Hi", "Once upon a time"]
    texts = lm.generate_until([req("generate_until", p, {"until": [], "max_gen_toks": n, "do_sample": False})
                               for p, n in zip(prompts, (5, 9, 1))])
    model, tok = reference_backend.model, reference_backend.tokenizer
    for p, n, text in zip(prompts, (5, 9, 1), texts):
        ids = model.generate(tok.encode(p), n, eos_token_ids=(tok.eos_token_id,))
        assert text == tok.decode(ids, skip_special_tokens=True)
    sent = [s for _, params in spy.generate_calls for s in params]
    assert sorted(s.max_new_tokens for s in sent) == [1, 5, 9] and all(s.temperature == 0 for s in sent)


def test_generate_until_cuts_at_the_first_stop_string(reference_backend):
    lm = HelixLM(reference_backend, max_length=256)
    prompt = "Question: name a colour.\nAnswer:"
    full, = lm.generate_until([req("generate_until", prompt, {"until": [], "max_gen_toks": 12})])
    stop = full[len(full) // 2:len(full) // 2 + 1]
    assert stop, f"generation too short to pick a stop string: {full!r}"
    cut, = lm.generate_until([req("generate_until", prompt, {"until": [stop], "max_gen_toks": 12})])
    assert cut == full[:full.index(stop)]


def test_sampling_settings_reach_the_backend_and_are_reproducible(reference_backend):
    spy = Spy(reference_backend)
    lm = HelixLM(spy, max_length=256)
    kwargs = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 0.8, "top_p": 0.9}
    first = lm.generate_until([req("generate_until", "Tell me", kwargs)])
    again = lm.generate_until([req("generate_until", "Tell me", kwargs)])
    params: SamplingParams = spy.generate_calls[0][1][0]
    assert (params.temperature, params.top_p, params.stop_strings) == (0.8, 0.9, ("\n\n",))
    assert params.stop_token_ids == (reference_backend.tokenizer.eos_token_id,)
    assert first == again


def test_non_finite_logits_fail_naming_the_side_request_and_step(nan_checkpoint):
    backend = ReferenceBackend(str(nan_checkpoint))
    with pytest.raises(NonFiniteLogits, match="reference request 1, step 1: logits hold NaN or inf"):
        backend.generate([[1, 2], [3, 4]], [SamplingParams(max_new_tokens=0), SamplingParams(max_new_tokens=2)])
    with pytest.raises(NonFiniteLogits, match="reference request 0, step 1: logits hold NaN or inf"):
        backend.score([([1, 2], [3, 4])])


def test_progress_bar_is_labelled_by_its_caller(reference_backend, capsys):
    lm = HelixLM(reference_backend, max_length=256)
    lm.loglikelihood([req("loglikelihood", "The sky is", " blue")])
    assert "helix loglikelihood: 100%" in capsys.readouterr().err  # the default: the lm-eval model and request type
    lm.with_progress(Progress("reference mmlu")).loglikelihood([req("loglikelihood", "The sky is", " blue")])
    assert "reference mmlu: 100%" in capsys.readouterr().err


def test_model_args_pretrained_form(tiny_checkpoint):
    lm = HelixLM.create_from_arg_string(f"pretrained={tiny_checkpoint},backend=reference,dtype=float64,batch_size=5",
                                        {"batch_size": 1, "device": "cuda"})  # lm-eval's CLI defaults
    assert isinstance(lm.backend, ReferenceBackend)
    assert lm.batch_size == 5 and lm.max_length == 16384 and lm.backend.model.dtype == torch.float64


def test_model_args_config_form(tiny_checkpoint, tmp_path):
    deploy = tmp_path / "deploy.json"
    deploy.write_text(json.dumps(deployment_dict(BackendSpec(model=tiny_checkpoint, cp=3).run_spec())))
    lm = HelixLM.create_from_arg_string(f"config={deploy},backend=reference,max_length=512", {})
    assert isinstance(lm.backend, ReferenceBackend) and lm.max_length == 512


def test_helix_deployment_built_from_pretrained_args(tiny_checkpoint):
    spec = BackendSpec(model=tiny_checkpoint, cp=3, tokens_per_block=16).run_spec()
    assert spec.generation == HelixConfig(context_parallel_size=3, tokens_per_block=16)
    assert spec.context == ContextServerConfig(tensor_parallel_size=1, tokens_per_block=16)
    assert spec.model == tiny_checkpoint and spec.world_size == 4


@pytest.mark.parametrize("args, match", [
    ("backend=reference", "give exactly one"),
    ("pretrained=/x,config=/y,backend=reference", "give exactly one"),
    ("pretrained=/x,backend=vllm", "backend='vllm'"),
    ("pretrained=/x,backend=reference,dtype=int8", "dtype='int8'"),
    ("pretrained=/x,backend=reference,temperature=1", "unknown"),
])
def test_bad_model_args_are_refused_with_the_key(args, match):
    with pytest.raises(ConfigError, match=match):
        HelixLM.create_from_arg_string(args, {})


# --------------------------------------------------------------------------------------------- chat templates


def gsm8k_prompt(lm: HelixLM, data_dir: str, **chat) -> list[int]:
    """The token ids of the one GSM8K prompt (2-shot) lm-eval hands the model, with lm-eval's chat settings."""
    import lm_eval

    from evals.task_data import task_dir, task_manager

    spy = Spy(lm.backend)
    lm.backend = spy
    with task_dir(data_dir) as path:
        lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"], task_manager=task_manager(path), num_fewshot=2, limit=1,
                                gen_kwargs={"max_gen_toks": 2}, bootstrap_iters=0, **chat)
    (prompts, _), = spy.generate_calls
    return prompts[0]


@pytest.mark.parametrize("chat", ["multiturn", "one-turn", "off"])
def test_chat_template_renders_the_prompt_the_model_gets(reference_backend, data_dir, chat):
    tok = reference_backend.tokenizer
    ids = gsm8k_prompt(HelixLM(reference_backend, max_length=4096), data_dir, apply_chat_template=chat != "off",
                       fewshot_as_multiturn=chat == "multiturn")
    text = tok.decode(ids)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, not a second one
    if chat == "off":
        assert text.startswith("<|bos|>Question: ") and "User: " not in text
        return
    assert text.startswith("<|bos|>User: Question: ") and text.endswith("\n\nAssistant:")
    # multi-turn: each example a user turn and an assistant turn closed by EOS; else all in one user turn
    assert (text.count("User: "), text.count("<|eos|>")) == ((3, 2) if chat == "multiturn" else (1, 0))


def test_chat_template_is_refused_without_one(reference_backend):
    lm = HelixLM(reference_backend, max_length=256)
    assert lm.chat_template(True) == reference_backend.tokenizer.chat_template
    lm.tokenizer = type("NoTemplate", (), {"chat_template": None, "name_or_path": "/ckpt"})()
    with pytest.raises(ConfigError, match="apply_chat_template=True: the tokenizer of /ckpt has no chat_template"):
        lm.chat_template(True)
