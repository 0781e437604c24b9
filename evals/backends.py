"""What the lm-eval adapter talks to: the disaggregated Helix cluster, the single-device reference, or any
OpenAI-compatible completions endpoint (``helix serve``, vLLM, trtllm-serve, SGLang).

All offer the driver interface of ``helix.disagg.launch(...)``:

* ``tokenizer``: the checkpoint's transformers tokenizer;
* ``generate(prompts, sampling) -> list[list[int]]``: generated ids only, per prompt; ``sampling`` is one
  ``SamplingParams`` or one per prompt; generation stops at ``max_new_tokens``, at a stop token id (kept) or
  once the generated text contains a stop string (ids kept up to the token that completed it);
* ``score([(context_ids, continuation_ids), ...]) -> [(logprobs, greedy_flags), ...]``, per continuation
  token: its log-probability given everything before it, and whether it is the argmax;
* ``shutdown()``, and use as a context manager.

Scoring groups requests that feed the model the same tokens (context + continuation without its last
token): they differ only in which logits they read, so the four choices of an MMLU question cost one forward
pass on the reference and one Helix request (one context-server prefill, one decode step) on the cluster.

``make_backend(spec)`` is the only place that chooses between them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from helix.checkpoint import DTYPES
from helix.config import ConfigError
from helix.disagg.deploy import from_checkpoint, load_deployment
from helix.engine import Request
from helix.sampling import SamplingParams, check_finite, first_stop, per_prompt, score_rows, select_token
from helix.sources import source_config
from helix.spec import RunSpec
from helix.tokenizer import load_tokenizer

BACKENDS = ("helix", "reference", "endpoint")


@dataclass
class BackendSpec:
    """The adapter's model_args: which backend, and what it serves: for the helix and reference backends the
    deployment file ``config``, or, from the checkpoint ``model``, context server 1 + Helix generation server
    N = ``cp`` (helix.disagg.from_checkpoint; ``run_spec``); for the endpoint backend ``url`` (an OpenAI-compatible
    server's base URL, e.g. http://host:8000/v1) and ``tokenizer`` (a directory with the served model's tokenizer).

    ``max_tokens``: the KV capacity per sequence of the deployment built from ``model`` (context and generation
    servers), so that every prompt the adapter lets in (its ``max_length``) is served; None keeps the
    deployment's default. A deployment file states its own capacity, an endpoint its ``max_model_len``."""

    backend: str = "helix"
    model: str | None = None
    config: str | None = None
    url: str | None = None
    tokenizer: str | None = None
    cp: int = 2
    tokens_per_block: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    max_tokens: int | None = None
    colocate: bool = False  # the deployment built from ``model``: context server on generation rank 0's GPU
    kv_dtype: str = "auto"  # the deployment built from ``model``: kv_cache_config.dtype (auto, or fp8)
    attention: str = "plain"  # the reference's attention: "plain" (chunked, the definition) or "sdpa" (fused)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r}: choose one of {list(BACKENDS)}")
        if self.backend == "endpoint":
            if self.url is None or self.tokenizer is None or self.model is not None or self.config is not None:
                raise ConfigError(f"url={self.url!r}, tokenizer={self.tokenizer!r}: the endpoint backend needs both "
                                  "(the server's base URL, the served model's tokenizer directory) and no model/config")
        elif (self.model is None) == (self.config is None) or self.url is not None:
            raise ConfigError(f"model={self.model!r}, config={self.config!r}: give exactly one of them "
                              "(a checkpoint directory, or a deployment file)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose one of {sorted(DTYPES)}")
        self.cp, self.tokens_per_block = int(self.cp), int(self.tokens_per_block)
        if isinstance(self.colocate, str):  # from an lm-eval model_args string
            if self.colocate.lower() not in ("true", "false"):
                raise ConfigError(f"colocate={self.colocate!r}: must be true or false")
            self.colocate = self.colocate.lower() == "true"

    def run_spec(self) -> RunSpec:
        """The run (docs/design.md §4.4) the helix backend launches."""
        if self.config is not None:
            return load_deployment(self.config)
        return from_checkpoint(self.model, cp=self.cp, tokens_per_block=self.tokens_per_block, dtype=self.dtype,
                               device=self.device, max_tokens=self.max_tokens, colocate=self.colocate,
                               kv_dtype=self.kv_dtype)

    def deployed_kv_dtype(self) -> str:
        """The KV cache dtype the Helix deployment runs with (the reference keeps its own, unquantized)."""
        if self.config is None:
            return self.kv_dtype
        return load_deployment(self.config).generation.kv_dtype

    def capacity(self) -> int | None:
        """What a deployment file holds per sequence (the smaller of its servers' KV capacities), or an endpoint
        (its ``max_model_len``, when it reports one); None for the deployment built from ``model``, which is
        sized to ``max_tokens``."""
        if self.url is not None:
            return endpoint_model(self.url)[1]
        if self.config is None:
            return None
        dep = load_deployment(self.config)
        return min(dep.context.max_tokens, dep.generation.max_tokens)

    def max_position(self) -> int:
        """The longest sequence the model takes: its checkpoint's max_position_embeddings; an endpoint's
        max_model_len, else its tokenizer's model_max_length."""
        if self.url is None:
            return source_config(self.model_dir()).max_position_embeddings
        reported = self.capacity()
        return reported if reported is not None else load_tokenizer(self.tokenizer).model_max_length

    def name(self) -> str:
        """What the report calls the model: the checkpoint directory, or the endpoint's served model and URL."""
        return self.model_dir() if self.url is None else f"{endpoint_model(self.url)[0]} at {self.url}"

    def model_name(self) -> str:
        """The model's last path component (golden/accuracy matches published figures by it)."""
        return os.path.basename(os.path.normpath(self.model_dir() if self.url is None else endpoint_model(self.url)[0]))

    def tokenizer_dir(self) -> str:
        return self.tokenizer if self.url is not None else self.model_dir()

    def model_dir(self) -> str:
        return self.model if self.model is not None else load_deployment(self.config).model


def make_backend(spec: BackendSpec):
    """The Helix cluster (``helix.disagg.launch``), the single-device reference or an endpoint, all used as
    context managers. The reference runs the same weights, dtype and device as the deployment would (its dtype
    may also be float64, the oracle's)."""
    if spec.backend == "helix":
        from helix.disagg import launch  # the driver API of the disaggregated deployment

        return HelixBackend(launch(spec.run_spec()))
    if spec.backend == "endpoint":
        return EndpointBackend(spec.url, spec.tokenizer)
    return ReferenceBackend(spec.model_dir(), dtype=spec.dtype, device=spec.device, attention=spec.attention)


def openai_client(url: str, timeout_s: float):
    """An ``openai`` client of the server at ``url`` (the key from OPENAI_API_KEY; servers here take any)."""
    import openai

    return openai.OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), max_retries=2,
                         timeout=timeout_s)


def endpoint_model(url: str) -> tuple[str, int | None]:
    """The first model an OpenAI-compatible server lists at ``url``/models: its id and, if reported (vLLM,
    helix serve), its max_model_len."""
    import openai

    try:
        with openai_client(url, 60) as client:
            first = client.models.list().data[0]
    except (openai.APIError, IndexError) as e:
        raise ConfigError(f"url={url!r}: no model listed at {url}/models ({' '.join(str(e).split())})") from None
    return first.id, (first.model_extra or {}).get("max_model_len")


def group_by_input(requests: list[tuple[list[int], list[int]]]) -> dict[tuple[int, ...], list[int]]:
    """``{tokens fed to the model: [request indices]}``; the tokens are context + continuation[:-1]."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {i}: score needs a non-empty context and continuation "
                             f"(got {len(context)} and {len(continuation)} tokens)")
        groups[tuple(context) + tuple(continuation[:-1])].append(i)
    return groups


def read_scores(rows: torch.Tensor, continuation: list[int]) -> tuple[list[float], list[bool]]:
    """rows [len(continuation), V]: row k holds the logits that predict continuation[k]."""
    logprobs, greedy, _ = score_rows(rows, continuation)
    return logprobs, greedy


class Backend:
    """A context manager that shuts the backend down on leaving."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class HelixBackend(Backend):
    """The driver interface on a disaggregated cluster (``helix.disagg.launch``), with grouped scoring.

    A group of requests with the same input tokens becomes one teacher-forced Helix request that starts after
    the group's shortest context and keeps its steps' logits; each member reads its own rows. A request alone
    in its group goes through ``cluster.score`` as it is (no logits travel back)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.tokenizer = cluster.tokenizer

    def shutdown(self) -> None:
        self.cluster.shutdown()

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        return self.cluster.generate(prompts, sampling)

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[list[float], list[bool]]]:
        from helix.disagg import RequestError

        groups = list(group_by_input(requests).items())
        batch = []
        for g, (tokens, members) in enumerate(groups):
            start = min(len(requests[i][0]) for i in members)
            # The forced tokens after the prompt are the inputs of the later steps; the last one is only read.
            forced = list(tokens[start:]) + [requests[members[0]][1][-1]]
            batch.append(Request(g, list(tokens[:start]), forced=forced, keep_logits=len(members) > 1))
        results = self.cluster.run(batch)
        RequestError.raise_if_failed(results)
        out: list[tuple[list[float], list[bool]]] = [([], [])] * len(requests)
        for (_, members), req, res in zip(groups, batch, results):
            if len(members) == 1:
                out[members[0]] = (res.logprobs, res.greedy)
                continue
            rows = torch.stack(res.logits)  # [len(forced), V]; row k predicts the token at len(req.prompt) + k
            for i in members:
                context, continuation = requests[i]
                out[i] = read_scores(rows[len(context) - len(req.prompt):], continuation)
        return out


class ReferenceBackend(Backend):
    """The driver interface on the single-device oracle (``helix.reference.ReferenceModel``), one request at a time."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu", attention: str = "plain"):
        """``attention``: the reference's "plain" or "sdpa" attention (``ReferenceModel``)."""
        from helix.reference import ReferenceModel
        from helix.sources import load_source_tokenizer

        self.model = ReferenceModel.from_checkpoint(model_dir, dtype=DTYPES[dtype], device=device, attention=attention)
        self.tokenizer = load_source_tokenizer(model_dir)

    def shutdown(self) -> None:
        """Nothing runs in the background; kept for the driver interface."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        params = per_prompt(sampling, len(prompts))
        return [self._generate_one(i, p, s) for i, (p, s) in enumerate(zip(prompts, params))]

    def _generate_one(self, request: int, prompt: list[int], params: SamplingParams) -> list[int]:
        out: list[int] = []
        if params.max_new_tokens == 0:
            return out
        logits, cache = self.model.prefill(prompt, logits_from=len(prompt) - 1)  # the last row only: [1, V]
        logits = logits[0]
        for step in range(params.max_new_tokens):
            check_finite(logits, "reference", request, step + 1)
            out.append(select_token(logits, params, step))
            if out[-1] in params.stop_token_ids:
                break
            text = self.tokenizer.decode(out, skip_special_tokens=True) if params.stop_strings else ""
            if first_stop(text, params.stop_strings) is not None:
                break
            if step + 1 < params.max_new_tokens:
                logits = self.model.decode(out[-1], cache)
        return out

    @torch.no_grad()
    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[list[float], list[bool]]]:
        results: list[tuple[list[float], list[bool]]] = [([], [])] * len(requests)
        for tokens, members in group_by_input(requests).items():
            logits, _ = self.model.prefill(list(tokens))  # [T, V] float32; row t predicts token t + 1
            for i in members:
                context, continuation = requests[i]
                check_finite(logits[len(context) - 1:], "reference", i)
                results[i] = read_scores(logits[len(context) - 1:], continuation)
        return results


class EndpointBackend(Backend):
    """The driver interface on an OpenAI-compatible completions endpoint: one HTTP request per prompt, ``CONCURRENCY``
    in flight (the server batches them), token-id prompts (the tokenizer here only measures and decodes).

    ``score`` sends context + continuation with ``echo``, ``logprobs=1`` and ``max_tokens=1``, as lm-eval's
    ``local-completions`` does, and reads the continuation's prompt log-probs; a token is greedy when its log-prob
    is the largest of its top alternatives. The server must support echo with logprobs (helix serve and vLLM do).
    ``generate`` asks for greedy or seeded sampling with the stop strings; the server stops at its EOS tokens.
    The returned ids are the completion's text re-encoded, which decodes back to that text."""

    CONCURRENCY = 32

    def __init__(self, url: str, tokenizer_dir: str):
        self.model = endpoint_model(url)[0]
        self.client = openai_client(url, 3600)
        self.tokenizer = load_tokenizer(tokenizer_dir)

    def shutdown(self) -> None:
        self.client.close()

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(self.CONCURRENCY) as pool:
            return list(pool.map(fn, items))

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        def one(job: tuple[list[int], SamplingParams]) -> list[int]:
            prompt, params = job
            if params.max_new_tokens == 0:
                return []
            r = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=params.max_new_tokens,
                                               temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                                               stop=list(params.stop_strings) or None)
            return self.tokenizer.encode(r.choices[0].text, add_special_tokens=False)

        return self._map(one, list(zip(prompts, per_prompt(sampling, len(prompts)))))

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[list[float], list[bool]]]:
        group_by_input(requests)  # the same checks as the other backends

        def one(request: tuple[list[int], list[int]]) -> tuple[list[float], list[bool]]:
            context, continuation = request
            r = self.client.completions.create(model=self.model, prompt=context + continuation, max_tokens=1,
                                               temperature=0, logprobs=1, echo=True)
            lp = r.choices[0].logprobs
            span = slice(len(context), len(context) + len(continuation))
            logprobs = lp.token_logprobs[span]
            return logprobs, [x == max(top.values()) for x, top in zip(logprobs, lp.top_logprobs[span])]

        return self._map(one, requests)

