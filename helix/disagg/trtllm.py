"""TensorRT-LLM's disaggregated configuration, accepted as written (docs/design.md §4.5).

TensorRT-LLM describes a disaggregated deployment in one YAML file (``trtllm-serve disaggregated -c``):

    hostname, port                    the disaggregated HTTP server's address
    LLM-API keys at the top level     inherited by both sections; a section that sets one to another value is
                                      an error there, and so it is here
    context_servers, generation_servers
                                      num_instances, urls, and that role's LLM-API keys

Its Helix accuracy test writes such a file (context: tensor_parallel_size 2; generation: context_parallel_size
2 with cp_config HELIX; block reuse and chunked prefill off). ``translate(raw)`` turns one into the native
deployment dict that deploy.py parses, and returns the keys it accepted as changing nothing here. Each key is:

* native: the deployment file's own keys, parsed by deploy.py and HelixConfig (``tensor_parallel_size``,
  ``context_parallel_size``, ``cp_config``, ``kv_cache_config.tokens_per_block`` / ``max_tokens``, ...);
* inert (``INERT``, ``INERT_KV``): accepted with every value that leaves results and capacity as the native keys
  set them, dropped here and listed in one INFO line;
* refused: an inert key with a value that would change results or that this runtime cannot honour
  (``enable_block_reuse: true``, ``num_instances: 2``), named with the rule;
* unknown: refused by the native parsers, as before.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

from helix.config import fail

SECTIONS = ("context_servers", "generation_servers")
NATIVE_TOP = ("model", *SECTIONS)

# A check returns None when the value is accepted, else the rule it breaks.
Check = Callable[[Any], "str | None"]


def _equals(want, why: str) -> Check:
    return lambda v: None if v == want and type(v) is type(want) else f"must be {want!r}: {why}"


def _fraction(v) -> str | None:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "must be a number in (0, 1]"


def _boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _port(v) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535
    return None if ok else "must be an integer port in [0, 65535]"


def _hostname(v) -> str | None:
    return None if isinstance(v, str) and v else "must be a host name"


TRANSCEIVERS = ("DEFAULT", "UCX", "NIXL", "MPI")


def _transceiver(v) -> str | None:
    if not isinstance(v, dict):
        return "must be a mapping {backend: ..., max_tokens_in_buffer: ...}"
    for key, value in v.items():
        if key == "backend" and value not in TRANSCEIVERS:
            return f"backend must be one of {list(TRANSCEIVERS)}"
        if key == "max_tokens_in_buffer" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return "max_tokens_in_buffer must be a positive integer"
        if key not in ("backend", "max_tokens_in_buffer"):
            return f"unknown key {key!r}; takes backend and max_tokens_in_buffer"
    return None


NO_REUSE = ("this runtime prefills every prompt in full and keeps no prefix cache, so KV block reuse cannot be "
            "honoured")

# Inert keys and the values accepted; the comment says why they change nothing here (docs/design.md §4.5).
# LLM-API keys, at the top level (both sections inherit them) or in a section:
INERT: dict[str, Check] = {
    "backend": _equals("pytorch", "this runtime is PyTorch; it builds no TensorRT engines"),
    "free_gpu_memory_fraction": _fraction,  # KV capacity is kv_cache_config.max_tokens per slot x max_batch_size
    "disable_overlap_scheduler": _boolean,  # host scheduling overlap: a step's result is the same either way
    "enable_chunked_prefill": _equals(False, "the context server prefills each prompt in one pass"),
    "pipeline_parallel_size": _equals(1, "this runtime has no pipeline parallelism"),
    "cache_transceiver_config": _transceiver,  # the hand-over is torch.distributed point-to-point, by block owner
}
# kv_cache_config's keys besides the native tokens_per_block and max_tokens:
INERT_KV: dict[str, Check] = {
    "enable_block_reuse": _equals(False, NO_REUSE),
    "enable_partial_reuse": _equals(False, NO_REUSE),
    "free_gpu_memory_fraction": _fraction,
}
# The disaggregated server's address: the ranks meet through torch.distributed; no HTTP router is started.
INERT_TOP: dict[str, Check] = {"hostname": _hostname, "port": _port}


def _urls(v) -> str | None:
    if not isinstance(v, list) or len(v) != 1 or not isinstance(v[0], str) or v[0].count(":") != 1:
        return "must be a list of one 'host:port' (num_instances is 1)"
    return None


# A section's instances and their addresses (unused, as hostname and port):
INERT_SECTION: dict[str, Check] = {
    "num_instances": _equals(1, "a deployment here is one context server and one generation server (no router "
                                "across instances)"),
    "urls": _urls,
}


def _take(node: dict, table: dict[str, Check], prefix: str, accepted: list[str]) -> dict:
    """``node`` without the keys of ``table``, each checked (refused naming key and rule) and listed in
    ``accepted`` as written."""
    out = {}
    for key, value in node.items():
        if key not in table:
            out[key] = value
            continue
        if (rule := table[key](value)) is not None:
            fail(prefix + key, value, rule)
        accepted.append(f"{prefix}{key}={value!r}")
    return out


def _strip(node: dict, prefix: str, accepted: list[str]) -> dict:
    """A section (or the top level's LLM-API keys) without its inert keys, kv_cache_config's included."""
    out = _take(node, INERT, prefix, accepted)
    if isinstance(out.get("kv_cache_config"), dict):
        out["kv_cache_config"] = _take(out["kv_cache_config"], INERT_KV, prefix + "kv_cache_config.", accepted)
    return out


def translate(raw: dict) -> tuple[dict, list[str]]:
    """(the native deployment dict, the inert keys accepted, as ``key=value``) of a deployment in TensorRT-LLM's
    form; a native file comes back as it is, with no inert keys."""
    accepted: list[str] = []
    top = _take({k: v for k, v in raw.items() if k not in NATIVE_TOP}, INERT_TOP, "", accepted)
    for key, value in top.items():
        if key not in INERT and key != "kv_cache_config":
            fail(key, value, f"unknown section; a deployment file has the sections {list(NATIVE_TOP)}, TensorRT-LLM's "
                             f"{sorted(INERT_TOP)}, and the LLM-API keys {sorted(INERT)} and kv_cache_config")
    shared = _strip(top, "", accepted)
    out = {k: v for k, v in raw.items() if k in NATIVE_TOP}
    for name in SECTIONS:
        section = raw.get(name)
        if not isinstance(section, dict):
            continue  # deploy.parse names a missing section
        for key, value in top.items():  # TensorRT-LLM's rule: a top-level key applies to both sections
            if key in section and section[key] != value:
                fail(f"{name}.{key}", section[key], f"differs from the top-level {key}={value!r}; a top-level key "
                                                     "applies to both sections (as in TensorRT-LLM)")
        out[name] = {**shared, **_strip(_take(section, INERT_SECTION, f"{name}.", accepted), f"{name}.", accepted)}
    return out, accepted
