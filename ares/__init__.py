"""ARES: adaptive, resource-aware split learning for IoT fleets.

Layers (checked by import-linter, see .importlinter):
  ares.core     pure: models and splitting, data, wire format, configs, energy, cost model and
                optimiser, round records
  ares.runtime  server, device trainer, profiler, controller loop, power, network namespaces
  ares.roles    command line, local runner, host-control sidecar, testbed
"""

__version__ = "0.1.0"
