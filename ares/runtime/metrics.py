"""Prometheus metrics, rendered from the same status and telemetry the controller reads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from ares.core.messages import ServerStatus, Telemetry


def render(status: ServerStatus, telemetry: Telemetry) -> str:
    reg = CollectorRegistry()
    Gauge("ares_round", "Index of the round in progress", registry=reg).set(status.round)
    Gauge("ares_rounds_total", "Rounds the job will run", registry=reg).set(status.rounds)
    if status.accuracy is not None:
        Gauge("ares_accuracy", "Test accuracy after the last round", registry=reg).set(status.accuracy)
    if status.loss is not None:
        Gauge("ares_loss", "Test loss after the last round", registry=reg).set(status.loss)
    split = Gauge("ares_device_split", "Split point in use", ["device"], registry=reg)
    up = Gauge("ares_device_up_bytes_per_second", "Measured device->server throughput", ["device"], registry=reg)
    down = Gauge("ares_device_down_bytes_per_second", "Measured server->device throughput", ["device"], registry=reg)
    energy = Gauge("ares_device_round_energy_joules", "Device energy in its last round", ["device", "source"], registry=reg)
    round_s = Gauge("ares_device_round_seconds", "Device's last round duration", ["device"], registry=reg)
    for name, d in status.devices.items():
        if d.split is not None:
            split.labels(name).set(d.split)
        if d.up_bps:
            up.labels(name).set(d.up_bps)
        if d.down_bps:
            down.labels(name).set(d.down_bps)
        if d.energy_j is not None:
            energy.labels(name, d.energy_source).set(d.energy_j)
        if d.round_s is not None:
            round_s.labels(name).set(d.round_s)
    server = Gauge("ares_server_seconds_per_batch", "Server-part compute per batch", ["split"], registry=reg)
    for s, (f, b) in enumerate(zip(telemetry.server_fwd, telemetry.server_bwd)):
        server.labels(str(s)).set(f + b)
    events = Counter("ares_refused", "Requests and rounds the server refused or recovered from, by kind "
                     "(uploads_refused, steps_refused, tick_errors, ...)", ["kind"], registry=reg)
    for kind, count in status.counters.items():
        events.labels(kind).inc(count)
    return generate_latest(reg).decode()
