"""The pure core: no network, no Kubernetes; files only."""
