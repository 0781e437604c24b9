"""Disaggregated serving: a context server prefills, a Helix generation server decodes (docs/design.md §1.3,
§1.4, §5).

``launch(config) -> Cluster`` is the driver API (cluster.py); the deployment file is parsed and validated
into a ``RunSpec`` (helix/spec.py) in deploy.py; the KV hand-over by block ownership is kv_transfer.py, the
request log and admission signals handoff.py.
"""

from helix.disagg.cluster import BatchReport, Cluster, ClusterDown, RequestError, launch
from helix.disagg.deploy import from_checkpoint, load_deployment

__all__ = ["BatchReport", "Cluster", "ClusterDown", "RequestError", "from_checkpoint", "launch", "load_deployment"]
