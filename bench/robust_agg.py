"""What each aggregation costs: time to merge, and accuracy with and without an attacker.

(a) Time: merging N whole VGG5 models (582,346 parameters each) with `fedavg`, `norm_clip`,
    `median` and `trimmed_mean`, measured side by side; printed as ms and as a ratio to fedavg.
(b) Accuracy: a short federated run in this process (the real TrainingServer and DeviceTrainers
    over the in-process link, FL mode, synthetic data) per aggregation, once with every device
    honest and once with one device that uploads a scaled, sign-flipped update (-4x its own
    update: inside the default `max_update_norm`, so only the aggregation can stop it).

    python bench/robust_agg.py [--devices 32] [--fl-devices 5] [--rounds 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ares.core.config import AggregationConfig, DataConfig, DeviceSettings  # noqa: E402
from ares.core.fedavg import aggregate  # noqa: E402
from ares.core.models import build_model  # noqa: E402
from ares.runtime.device import DeviceTrainer  # noqa: E402
from ares.runtime.inprocess import InProcessLink  # noqa: E402
from ares.runtime.training import TrainingServer, read_tokens  # noqa: E402
from tests.conftest import small_config  # noqa: E402

METHODS = ["fedavg", "norm_clip", "median", "trimmed_mean"]


def merge_times(n: int, repeats: int = 3) -> dict[str, float]:
    torch.manual_seed(0)
    base = build_model("vgg5", seed=0).state_dict()
    states = [{k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
              for _ in range(n)]
    weights = [100.0] * n
    out = {}
    for method in METHODS:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            aggregate(method, states, weights, base, clip_norm=1.0, trim_fraction=0.2)
            best = min(best, time.perf_counter() - t0)
        out[method] = best
    return out


class Attacker(InProcessLink):
    """Uploads -4x its own update: a model-replacement attack kept under the norm bound."""

    def upload(self, report, weights):
        start = self.server.expected_weights(report.split)
        bad = {k: (s - 4.0 * (w - s)) if w.is_floating_point() else w for (k, w), s in
               zip(weights.items(), (start[k].cpu() for k in weights))}
        return super().upload(report, bad)


def fl_run(method: str, devices: int, rounds: int, attack: bool, tmp: Path) -> float:
    names = tuple(f"dev-{i}" for i in range(devices))
    cfg = small_config(tmp, devices=names, rounds=rounds, batch_size=50, max_steps_per_round=4, lr=0.05)
    cfg = cfg.model_copy(update={
        "round_gap_s": 0.0, "aggregation": AggregationConfig(method=method, clip_norm=2.0, trim_fraction=0.2),
        "data": DataConfig(name="synthetic-easy", synthetic_train=200 * devices, synthetic_test=500, seed=3)})
    server = TrainingServer(cfg, *read_tokens(cfg), profile=False)
    tok = tmp / "split"
    tok.write_text("6")  # FL: every layer on the device
    trainers = []
    for i, name in enumerate(names):
        link = (Attacker if attack and i == 0 else InProcessLink)(server, name)
        settings = DeviceSettings(name=name, server_url="inprocess", token_file=str(tok), split_file=str(tok))
        trainers.append(DeviceTrainer(settings, link))
    threads = [threading.Thread(target=t.run) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return server.history[-1].accuracy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=32, help="models merged in (a)")
    ap.add_argument("--fl-devices", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    times = merge_times(args.devices)
    print(f"(a) merging {args.devices} VGG5 models (one CPU thread):")
    for m in METHODS:
        print(f"    {m:13s} {times[m] * 1000:8.1f} ms   x fedavg {times[m] / times['fedavg']:.2f}")

    print(f"(b) accuracy after {args.rounds} FL rounds, {args.fl_devices} devices, synthetic data:")
    for m in METHODS:
        with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
            clean = fl_run(m, args.fl_devices, args.rounds, False, Path(d1))
            attacked = fl_run(m, args.fl_devices, args.rounds, True, Path(d2))
        print(f"    {m:13s} honest {clean:.3f}   one attacker {attacked:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
