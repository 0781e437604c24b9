"""Disaggregated serving: a context server prefills, a Helix generation server decodes (DESIGN §1, §5, §7).

``launch(config) -> Cluster`` is the driver API (cluster.py); the deployment file is parsed and validated
in deploy.py; the KV hand-over by block ownership is kv_transfer.py, the admission signals handoff.py.
"""

from helix.disagg.cluster import Cluster, RequestError, launch
from helix.disagg.deploy import Deployment, load_deployment
from helix.disagg.generation_server import BatchReport

__all__ = ["BatchReport", "Cluster", "Deployment", "RequestError", "launch", "load_deployment"]
