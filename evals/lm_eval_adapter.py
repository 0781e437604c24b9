"""lm-eval model ``helix``: every request goes through a backend with the Helix driver interface.

model_args, either form::

    config=DEPLOY.yaml[,backend=helix|reference]
    pretrained=DIR,cp=2,tokens_per_block=32,backend=helix|reference,dtype=float32,device=cpu[,colocate=true][,kv_dtype=fp8]
    backend=endpoint,base_url=http://HOST:PORT/v1,tokenizer=DIR      (any OpenAI-compatible completions server)

plus, in both: ``batch_size`` (requests per backend call, default 64), ``max_length`` (tokens the model
sees; default the checkpoint's ``max_position_embeddings``, or a deployment file's smaller KV capacity per
sequence, which bounds it; a deployment built from ``pretrained`` gets that KV capacity), ``max_gen_toks``
(default 256), ``seed`` (for sampled generation), ``attention`` (the reference's prefill attention, plain or
sdpa). ``backend=helix`` (the default) launches the disaggregated deployment through
``helix.disagg.launch``; ``backend=reference`` runs the same weights on the single-device oracle.

Chat templates: lm-eval's ``apply_chat_template`` / ``fewshot_as_multiturn`` (``--apply_chat_template``,
``--fewshot_as_multiturn``; ``helix eval --apply-chat-template``) render each prompt with the checkpoint tokenizer's
``chat_template`` (``apply_chat_template`` below, as lm-eval's HF model does), and a prompt that the template
already opened with BOS is encoded without a second one.

Importing this module registers the model, so ``lm_eval.simple_evaluate(model="helix", model_args=...)``
works after ``import evals.lm_eval_adapter``; lm-eval 0.4.13 has no plugin entry-point group, so the command
line goes through ``python -m evals.lm_eval_cli`` (see there).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import weakref
import zlib
from typing import TextIO

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from evals.backends import BackendSpec, make_backend
from helix.config import ConfigError
from helix.sampling import SamplingParams, first_stop

log = logging.getLogger(__name__)

# gen_kwargs keys that SamplingParams expresses; normalize_gen_kwargs maps the max-token aliases.
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}


@dataclasses.dataclass(frozen=True)
class Progress:
    """The progress bars' label (default "helix <request type>") and stream (default stderr): helix eval names the
    backend and task, and keeps the bars on the console while lm-eval's own output goes to its log."""

    label: str | None = None
    file: TextIO | None = None


@register_model("helix")
class HelixLM(TemplateLM):
    """Scoring and generation on ``backend`` (an object with the Helix driver interface, see evals/backends.py)."""

    def __init__(self, backend, max_length: int, max_gen_toks: int = 256, batch_size: int = 64, seed: int = 0,
                 progress: Progress = Progress()):
        super().__init__()
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self._max_length = int(max_length)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.progress = progress

    def with_progress(self, progress: Progress) -> "HelixLM":
        """This model on the same backend (still owned by ``self``) with other progress bars: helix eval takes one
        per task and context length."""
        view = copy.copy(self)
        view.progress = progress
        return view

    # ------------------------------------------------------------------ construction from model_args

    @staticmethod
    def backend_spec(args: dict) -> tuple[BackendSpec, int]:
        """The backend model_args ask for, and max_length; a deployment built from ``pretrained`` gets the KV
        capacity of max_length, so it serves every prompt the adapter lets in; a deployment file bounds it."""
        known = {"pretrained", "config", "base_url", "tokenizer", "backend", "cp", "tokens_per_block", "dtype",
                 "device", "colocate", "attention", "kv_dtype", "batch_size", "max_length", "max_gen_toks", "seed"}
        if unknown := sorted(set(args) - known):
            raise ConfigError(f"model_args {unknown}: unknown; helix takes {sorted(known)}")
        spec = BackendSpec(**{k: args[k] for k in ("backend", "config", "tokenizer", "cp", "tokens_per_block", "dtype",
                                                   "device", "colocate", "attention", "kv_dtype") if k in args},
                           model=args.get("pretrained"), url=args.get("base_url"))
        capacity = spec.capacity()
        max_length = int(args.get("max_length") or min(spec.max_position(), capacity or math.inf))
        if capacity is not None and max_length > capacity:  # refused now, not after hours of evaluation
            limit = (f"{spec.config} holds per sequence (kv_cache_config.max_tokens={capacity}); raise max_tokens there"
                     if spec.url is None else f"the endpoint {spec.url} takes (max_model_len={capacity})")
            raise ConfigError(f"max_length={max_length}: more than {limit} or ask for less")
        return dataclasses.replace(spec, max_tokens=max_length), max_length

    @classmethod
    def from_model_args(cls, args: dict) -> "HelixLM":
        """Build the backend from model_args (see the module docstring); the adapter then owns and shuts it down."""
        spec, max_length = cls.backend_spec(args)
        batch = args.get("batch_size", 64)
        lm = cls(make_backend(spec), max_length=max_length, max_gen_toks=int(args.get("max_gen_toks", 256)),
                 batch_size=64 if str(batch).startswith("auto") else int(batch), seed=int(args.get("seed", 0)))
        weakref.finalize(lm, lm.backend.shutdown)  # also runs at interpreter exit: no cluster process outlives us
        return lm

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "HelixLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "HelixLM":
        # lm-eval adds its own --batch_size (model_args win) and --device, which is ignored: its CLI default is
        # "cuda" whatever the user wants, so the device comes from model_args (device=...) alone.
        extra = {k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}
        return cls.from_model_args({**extra, **arg_dict})

    # ------------------------------------------------------------------ TemplateLM hooks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is conditioned on, and the first window of a rolling log-likelihood.
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False  # a chat template wrote the BOS already
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    # ------------------------------------------------------------------ chat templates

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm-eval renders with (TemplateLM's choice among the tokenizer's); refused when asked for and
        the tokenizer has none, instead of evaluating unformatted prompts as if they were formatted."""
        if chat_template and not self.tokenizer.chat_template:
            raise ConfigError(f"apply_chat_template={chat_template!r}: the tokenizer of {self.tokenizer.name_or_path} "
                              "has no chat_template (tokenizer_config.json or chat_template.jinja)")
        return super().chat_template(chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the tokenizer's template. lm-eval passes ``add_generation_prompt=False`` when
        the last message is an assistant prefix to continue (a task's ``gen_prefix``): that message stays open."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ batching

    def _batched(self, items: list, size_of, call, desc: str, disable_tqdm: bool) -> list:
        """``call`` on batches of ``items``, longest first (similar lengths batch together); results in input order."""
        order = sorted(range(len(items)), key=lambda i: -size_of(items[i]))
        results: list = [None] * len(items)
        with tqdm(total=len(items), desc=self.progress.label or desc, file=self.progress.file, unit="req",
                  disable=disable_tqdm or self.rank != 0) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, r in zip(idx, call([items[i] for i in idx])):
                    results[i] = r
                bar.update(len(idx))
        return results

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """At most ``max_length`` tokens go in (context + continuation minus its last): context is cut from the
        left, as lm-eval's HF model does; a continuation too long by itself keeps its last tokens."""
        whole = (context + continuation)[-(self.max_length + 1):]
        n = min(len(continuation), len(whole) - 1)
        return whole[:-n], whole[-n:]

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool):
        pairs = [self._fit(c, x) for c, x in pairs]
        return self._batched(pairs, lambda p: len(p[0]) + len(p[1]), self.backend.score, desc, disable_tqdm)

    # ------------------------------------------------------------------ request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = self._score([(ctx, cont) for _, ctx, cont in requests], "helix loglikelihood", disable_tqdm)
        out = []
        for (key, _, _), (logprobs, greedy) in zip(requests, scored):
            result = (float(sum(logprobs)), bool(all(greedy)))
            self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # Each document is cut into disjoint windows of at most max_length predicted tokens (lm-eval's rolling
        # scheme); every token is predicted once, the first one from prefix_token_id.
        windows, owner = [], []
        for n, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0], add_special_tokens=False)
            for w in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprobs, _) in zip(owner, self._score(windows, "helix loglikelihood_rolling", disable_tqdm)):
            totals[n] += sum(logprobs)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def _sampling(self, context: str, gen_kwargs: dict) -> SamplingParams:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if ignored := sorted(set(kwargs) - _GEN_KEYS):
            log.warning("helix: ignoring gen_kwargs %s (supported: %s)", ignored, sorted(_GEN_KEYS))
        eos = self.tokenizer.eos_token_id
        return SamplingParams(
            max_new_tokens=kwargs["max_gen_toks"],
            temperature=float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0,
            top_p=float(kwargs.get("top_p", 1.0)),
            # Per-request seed from the prompt: the same draw on every backend, whatever the batching.
            seed=zlib.crc32(context.encode()) ^ self.seed,
            stop_token_ids=() if eos is None else (eos,),
            stop_strings=tuple(s for s in kwargs["until"] if s))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            params = self._sampling(context, gen_kwargs)
            keep = self.max_length - params.max_new_tokens  # prompt + generation fit in max_length
            if keep < 1:
                raise ConfigError(f"max_gen_toks={params.max_new_tokens}: must be < max_length={self.max_length}")
            prompt = self.tok_encode(context)[-keep:]
            jobs.append((prompt, params))

        def run(batch):
            return self.backend.generate([p for p, _ in batch], [s for _, s in batch])

        outputs = self._batched(jobs, lambda j: len(j[0]), run, "helix generate_until", disable_tqdm)
        texts = []
        for req, (_, params), ids in zip(requests, jobs, outputs):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = first_stop(text, params.stop_strings)
            text = text if cut is None else text[:cut]
            self.cache_hook.add_partial("generate_until", req.args, text)
            texts.append(text)
        return texts
