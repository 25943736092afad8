"""The `ares` command. Each subcommand parses its config, then imports only what it needs,
so a Raspberry Pi running `ares device` never imports fastapi, kopf or matplotlib."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ares.runtime.device import RoundLog

TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath


def _run(args: argparse.Namespace) -> int:
    from ares.core.config import load_yaml_model
    from ares.roles.runconfig import RunConfig

    cfg = load_yaml_model(RunConfig, args.config) if args.config else RunConfig()
    updates: dict = {}
    for key in ("mode", "policy", "alpha", "results_dir", "port", "codec", "model", "micro_batches"):
        if getattr(args, key) is not None:
            updates[key] = getattr(args, key)
    if args.devices is not None:
        updates["devices"] = args.devices
    if args.tls:
        updates["tls"] = True
    training = {k: getattr(args, k) for k in ("rounds", "batch_size", "lr", "max_steps_per_round") if getattr(args, k) is not None}
    data = {k: v for k, v in (("name", args.dataset), ("path", args.data_dir), ("partition", args.partition)) if v is not None}
    merged = cfg.model_dump()
    merged.update(updates)
    merged["training"] = {**merged["training"], **training}
    merged["data"] = {**merged["data"], **data}
    cfg = RunConfig.model_validate(merged)
    from ares.roles.runner import run, set_aside, stop_on_signals

    with stop_on_signals():  # from here on a stop signal unwinds: what the run started is ended
        moved = set_aside(Path(cfg.results_dir))
        if moved is not None:
            print(f"the previous results in {cfg.results_dir} are now in {moved}")
        summary = run(cfg, progress=not args.quiet)
    print(f"done: {summary['rounds']} rounds, final accuracy {summary['final_accuracy']:.4f}, "
          f"mean round {summary['mean_round_s']:.2f} s; results in {cfg.results_dir}")
    return 0


def _server(args: argparse.Namespace) -> int:
    from ares.core.config import ServerConfig, load_yaml_model

    cfg = load_yaml_model(ServerConfig, args.config)
    # --port and --host choose where to listen, which only `serve` reads: the server's worker
    # loads the config file itself, unchanged (no copy of it is written anywhere).
    cfg = cfg.model_copy(update={k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None})
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for f in (args.tls_cert, args.tls_key):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"TLS file {f} not found")
    shard = _shard_role(args, cfg)
    if cfg.shards > 1:
        from ares.runtime.shardproto import read_shard_token

        read_shard_token(cfg)  # the root and every shard need it: say so now, not in the worker
    from ares.runtime.server import serve

    serve(cfg, args.config, tls_cert=args.tls_cert, tls_key=args.tls_key, shard=shard)
    return 0


def _shard_role(args: argparse.Namespace, cfg):
    """`--shard I --root URL` (and how to trust the root): this server is shard I of the job."""
    if (args.shard is None) != (args.root is None):
        raise ValueError("--shard and --root go together")
    if args.shard is None:
        if args.ca or args.tls_server_name:
            raise ValueError("--ca and --tls-server-name say how a shard trusts its --root")
        return None
    if cfg.shards < 2:
        raise ValueError(f"--shard needs a config with shards > 1 (this one has shards: {cfg.shards})")
    if not 0 <= args.shard < cfg.shards:
        raise ValueError(f"--shard {args.shard}: this job's shards are 0..{cfg.shards - 1}")
    if not args.root.startswith(("http://", "https://")):
        raise ValueError(f"--root must be an http:// or https:// URL, not {args.root!r}")
    if not args.root.startswith("https://") and (args.ca or args.tls_server_name):
        raise ValueError("--ca and --tls-server-name need an https:// root URL")
    if args.ca is not None and not Path(args.ca).is_file():
        raise FileNotFoundError(f"CA file {args.ca} not found")
    from ares.runtime.shard import RootAddress

    return RootAddress(index=args.shard, url=args.root, ca_file=args.ca, server_name=args.tls_server_name)


def _client_tls(args: argparse.Namespace):
    """The device's TLS settings from its flags; None for plain h2c (an http:// URL)."""
    from ares.runtime.tlsclient import ClientTls

    https = args.server.startswith("https://")
    if not https:
        if args.ca or args.tls_server_name:
            raise ValueError("--ca and --tls-server-name need an https:// server URL")
        return None
    if args.ca is not None and not Path(args.ca).is_file():
        raise FileNotFoundError(f"CA file {args.ca} not found")
    return ClientTls(ca_file=args.ca, server_name=args.tls_server_name)


def _fatal(message: str) -> None:
    """Log it, and leave it where Kubernetes shows it in the pod's status (terminated.message)."""
    logging.error("%s", message)
    try:
        with open(TERMINATION_LOG, "r+") as f:  # r+: never create it outside a pod
            f.truncate()
            f.write(message[:4000])
    except OSError:
        pass  # not in a pod


def _device(args: argparse.Namespace) -> int:
    import time

    from ares.core.config import DeviceSettings

    settings = DeviceSettings(name=args.name, server_url=args.server, token_file=args.token_file,
                              split_file=args.split_file, data_dir=args.data_dir, power_file=args.power_file,
                              hostctl_file=args.hostctl_file, trainer_file=args.trainer_file,
                              device_class=args.device_class, power_mode=args.power_mode,
                              profile_file=args.profile, rate_limit_file=args.rate_limit_file,
                              request_timeout_s=args.timeout, micro_batches=args.micro_batches, codec=args.codec,
                              duplex=args.duplex)
    import torch

    from ares.core.profiles import ComputeProfile
    from ares.runtime.allocator import keep_freed_memory
    from ares.runtime.cpulimit import fit_threads_to_cpu_limit
    from ares.runtime.device import DeviceTrainer
    from ares.runtime.link import HttpLink, RateLimit
    from ares.runtime.tlsclient import TlsError

    keep_freed_memory()
    fit_threads_to_cpu_limit()
    with open(settings.token_file) as f:
        token = f.read().strip()
    link = HttpLink(settings.server_url, settings.name, token, settings.request_timeout_s, http2=not args.http1,
                    rate_limit=RateLimit(settings.rate_limit_file), tls=_client_tls(args))
    deadline = time.monotonic() + args.wait_server
    try:
        while not link.healthy():  # a device pod may start before the server is up
            if time.monotonic() > deadline:
                logging.error("server %s not reachable after %.0f s", settings.server_url, args.wait_server)
                return 3
            time.sleep(1.0)
    except TlsError as exc:  # a wrong CA or name: waiting would not help
        _fatal(f"TLS: {exc}")
        return 4
    emulate = ComputeProfile.load(settings.profile_file) if settings.profile_file else None
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    trainer = DeviceTrainer(settings, link, emulate=emulate, torch_device=device,
                            on_round=lambda e: logging.info("%s", round_line(e)))
    trainer.run()
    link.close()
    return 0


def round_line(e: RoundLog) -> str:
    """A device's line for one round: what it did, and what its energy figure is made of."""
    line = f"round {e.round} split {e.split}: {e.steps} steps, loss {e.loss:.4f}, {e.round_s:.2f} s"
    if e.energy_j is None:
        return line
    table = f" at {e.power_mode}'s power" if e.power_mode else ""
    return (f"{line}; {e.energy_j:.4f} J {e.energy_source}{table} (compute {e.compute_s:.4f} s, "
            f"send {e.up_s:.4f} s, receive {e.down_s:.4f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ares", description="Adaptive, resource-aware split learning")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train on this machine: a server and N device processes")
    p.add_argument("--config", help="run config YAML (see examples/run.yaml)")
    p.add_argument("--devices", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--mode", help="adaptive | fixed:N | none")
    p.add_argument("--policy", help="ares | straggler")
    p.add_argument("--alpha", type=float, help="time weight, 0..1")
    p.add_argument("--model", help="vgg5 | resnet18")
    p.add_argument("--dataset", choices=["auto", "cifar10", "synthetic"])
    p.add_argument("--data-dir", help="where CIFAR-10 lives (default datasets/CIFAR10)")
    p.add_argument("--partition", choices=["iid", "dirichlet"])
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-steps-per-round", type=int)
    p.add_argument("--codec", choices=["fp32", "fp16", "int8"], help="activations and gradients on the wire")
    p.add_argument("--micro-batches", type=int, help="pipelined split steps: micro-batches per batch (1..8)")
    p.add_argument("--port", type=int)
    p.add_argument("--results-dir", help="default results/latest")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--tls", action="store_true", help="HTTPS between devices and server, with a throwaway CA")
    p.set_defaults(func=_run)

    p = sub.add_parser("server", help="the edge server (HTTP/2)")
    p.add_argument("--config", required=True, help="ServerConfig YAML/JSON")
    p.add_argument("--port", type=int, help="overrides the config's port")
    p.add_argument("--host", help="overrides the config's host")
    p.add_argument("--tls-cert", help="serve HTTPS (ALPN h2, then http/1.1) with this PEM certificate (chain)")
    p.add_argument("--tls-key", help="the certificate's PEM private key")
    p.add_argument("--shard", type=int, help="serve as shard I (0..shards-1) of a job with shards > 1, following "
                   "--root; without it, a config with shards > 1 runs the root")
    p.add_argument("--root", help="a shard's root, e.g. https://job-server.ns.svc:43000 (http:// = plain h2c)")
    p.add_argument("--ca", help="PEM CA certificate a shard trusts for an https:// root (only it; default: the system's)")
    p.add_argument("--tls-server-name", help="name the root's certificate must carry, when --root dials an address")
    p.set_defaults(func=_server)

    p = sub.add_parser("device", help="a device trainer")
    p.add_argument("--server", required=True, help="e.g. https://job-server.ns.svc:43000 (http:// = plain h2c)")
    p.add_argument("--ca", help="PEM CA certificate to trust for an https:// server (only it; default: the system's)")
    p.add_argument("--tls-server-name", help="name the server's certificate must carry, when the URL dials an address")
    p.add_argument("--name", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--split-file", required=True, help="re-read at every round start")
    p.add_argument("--data-dir")
    p.add_argument("--power-file", help="power.json written by the host-control sidecar")
    p.add_argument("--hostctl-file", help="hostctl.json written by the host-control sidecar: the power mode in force")
    p.add_argument("--trainer-file", help="where to say whether a round is under way (the sidecar switches modes between rounds)")
    p.add_argument("--device-class", default="cpu", help="jetson-nano | jetson-orin | raspberry-pi | cpu")
    p.add_argument("--power-mode", default="", help="MAXN | 5W | custom1 | custom3")
    p.add_argument("--profile", help="emulate this compute profile (JSON) by padding compute time")
    p.add_argument("--rate-limit-file", help="in-process link cap, JSON {up_bps, down_bps}")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--micro-batches", type=int, help="pipelined split steps (1..8); default: the server's")
    p.add_argument("--duplex", choices=["full", "half"], default="full",
                   help="half: this link's up and down share one rate (Wi-Fi); the optimiser models it so")
    p.add_argument("--codec", choices=["fp32", "fp16", "int8"], help="wire codec; default: the server's")
    p.add_argument("--wait-server", type=float, default=600.0, help="seconds to wait for the server")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--http1", action="store_true", help="HTTP/1.1 (for the uvicorn server option)")
    g.add_argument("--http2", action="store_true", help="HTTP/2 prior knowledge (default)")
    p.add_argument("--cpu", action="store_true", help="do not use CUDA even if present")
    p.set_defaults(func=_device)

    for module in ("ares.roles.optimise_cmd", "ares.roles.sidecar", "ares.roles.compare_cmd",
                   "ares.roles.simulate_cmd"):
        try:
            __import__(module, fromlist=["register"]).register(sub)
        except ImportError as exc:  # an optional role whose dependencies this install lacks
            if exc.name and exc.name.startswith("ares"):
                continue
            raise
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ares {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or a stop signal `ares run`/`ares bench` unwound from
        from ares.roles.runner import Stopped

        if isinstance(exc, Stopped):
            print(f"ares {args.command}: stopped by {exc}; what it started has been ended", file=sys.stderr)
            exit_at_once(exc.exit_code)
        return 130
    except BrokenPipeError:  # `ares optimise ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush is quiet too
        return 141


def exit_at_once(code: int) -> None:
    """Exit now, without the interpreter's teardown. A stopped command has ended what it started and
    has nothing left to write, while the teardown's garbage collection over torch's objects takes
    about a second of CPU: ten seconds and more on a loaded machine, after the user asked it to stop.
    Logs and output are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can reach it anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
