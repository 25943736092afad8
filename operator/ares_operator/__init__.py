"""The ARES Kubernetes operator: AresTrainingJob -> server pod, device pods, split annotations.

Run it with `kopf run --standalone -m ares_operator.handlers` (or `python -m ares_operator`).
Everything but `handlers` and `kube` is pure: builders, validation, status and conditions
turn plain dicts into plain dicts, so they are tested without a cluster.
"""
