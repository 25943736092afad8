"""The job's TLS Secret: a private CA per job and the server's certificate for its Service.

Pure, like builders.py: no API calls, no kopf. The handlers create the Secret once (a create
that finds it keeps the one in use, so a resumed or restarted operator never re-issues) and
read its CA back to check the server's certificate when they fetch its status.

Secret `<job>-tls` (type kubernetes.io/tls), owned by the job:
    ca.crt   the job's CA certificate: mounted into every device pod (and shard pod), alone
    tls.crt  the server's certificate, for every name of its Service and of each shard's
             (see `server_names`)
    tls.key  its private key: mounted into the server pod (and the shard pods) only
The CA's own key is never stored: nothing more can be signed for a job's CA, and rotating
means deleting the Secret (the operator makes a new one) and restarting the job's pods.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping
from typing import Any, Optional

from ares.core.pki import Authority, lifetime_for
from ares_operator import constants as c
from ares_operator.builders import JobRef, Obj, labels, owner_reference
from ares_operator.spec import JobSpec

ROUND_GAP_S = 0.5  # the server's default pause between rounds


def server_names(job: JobRef, cluster_domain: str = c.CLUSTER_DOMAIN, shards: int = 1) -> list[str]:
    """Every DNS name a pod may use for the server's Service, and (a job with shards > 1) for
    each shard's: one certificate serves the root and every shard."""
    services = [job.server_name, *(job.shard_name(i) for i in range(shards if shards > 1 else 0))]
    return [name for svc in services for name in
            (svc, f"{svc}.{job.namespace}", f"{svc}.{job.namespace}.svc", f"{svc}.{job.namespace}.svc.{cluster_domain}")]


def job_deadline_s(spec: JobSpec) -> float:
    """The longest the job can run: every round closing at its deadline, or its active deadline."""
    rounds = spec.training.rounds * (spec.run_policy.round_deadline_seconds + ROUND_GAP_S)
    active = getattr(spec.run_policy, "active_deadline_seconds", None) or 0
    return max(rounds, float(active))


def secret(job: JobRef, spec: JobSpec, now: Optional[datetime.datetime] = None) -> Obj:
    """A new CA and server certificate, valid twice the job's longest run (at least a year)."""
    ca = Authority(f"ares job {job.namespace}/{job.name}", lifetime_for(job_deadline_s(spec)), now)
    leaf = ca.issue_server(server_names(job, shards=spec.server.shards), now=now)
    data = {c.TLS_CA_KEY: ca.cert_pem, c.TLS_CERT_KEY: leaf.cert_pem, c.TLS_KEY_KEY: leaf.key_pem}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": job.tls_secret_name, "namespace": job.namespace, "labels": labels(job),
                         "ownerReferences": [owner_reference(job)]},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def ca_pem(secret_obj: Mapping[str, Any]) -> bytes:
    """The CA certificate a client of this job's server trusts."""
    value = (secret_obj.get("data") or {}).get(c.TLS_CA_KEY)
    if not value:
        raise ValueError(f"Secret {secret_obj.get('metadata', {}).get('name')} has no {c.TLS_CA_KEY}")
    return base64.b64decode(value)
