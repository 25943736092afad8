"""The runtime: server, device trainer, profiler and the controller loop."""
