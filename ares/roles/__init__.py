"""Entry points: the CLI, the local runner, the sidecar, the testbed."""
