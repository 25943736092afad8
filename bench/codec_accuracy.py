"""What 8-bit activations and pipelined steps cost in accuracy, on the harder synthetic set.

`ares bench` cut short (a few steps per round) leaves every variant at chance, so it cannot show
an accuracy cost. This trains the same federation in one process, fast enough to run many more
steps: N devices, VGG5, FedAvg weighted by samples after every round, SGD (lr 0.01, momentum
0.9, lr x 0.1 from half the rounds on, the published schedule) restarted each round as the
device and server do. Variants run one after another with the
same seed, data, shards and batch order:

- `fl`: every layer on the device (plain FL, the baseline);
- `CODEC/kK` at split S: the split step as the runtime does it: the activations of each
  micro-batch go through the codec (`ares.core.codec.pack`/`unpack`, round to nearest), the
  server part's loss is weighted by the micro-batch's share, the gradient comes back through
  the codec (stochastic rounding), gradients accumulate and both parts step once per batch.
  BatchNorm therefore normalises each micro-batch with its own statistics, as in the runtime.

Prints test accuracy per round and, at the end, each variant's final accuracy and its
difference to FL in points (measured in the same run). HTTP is left out: the wire changes
time, not numbers.

    python bench/codec_accuracy.py                       # fl, fp32/k1, fp16/k1, int8/k4 at split 1
    python bench/codec_accuracy.py --variants fl,int8/k4 --rounds 10 --devices 5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ares.core import codec  # noqa: E402
from ares.core.config import DataConfig, TrainingConfig  # noqa: E402
from ares.core.data import load_data, shard  # noqa: E402
from ares.core.fedavg import fedavg  # noqa: E402
from ares.core.models import build_model, n_layers, split_model  # noqa: E402


def split_step(device: nn.Module, server: nn.Module, x: torch.Tensor, y: torch.Tensor, wire: str, k: int,
               gen: torch.Generator) -> float:
    """One batch as k micro-batches through `wire`, gradients accumulated (the caller steps)."""
    total, loss_sum = len(y), 0.0
    for xi, yi in zip(torch.tensor_split(x, k), torch.tensor_split(y, k)):
        out = device(xi)
        sent = codec.unpack(codec.pack("x", out, wire), "x").requires_grad_(True)
        loss = nn.functional.cross_entropy(server(sent), yi)
        (loss * (len(yi) / total)).backward()
        grad = codec.unpack(codec.pack("grad", sent.grad, wire, stochastic=True, generator=gen), "grad")
        out.backward(grad)
        loss_sum += float(loss.detach()) * len(yi)
    return loss_sum / total


def accuracy(model: nn.Module, test, batch: int = 500) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=batch):
            right += int((model(x).argmax(1) == y).sum())
    model.train()
    return right / len(test)


def run(variant: str, args, data, shards) -> list[float]:
    torch.manual_seed(args.seed)
    model = build_model("vgg5", seed=args.seed)
    last = n_layers(model) - 1
    if variant == "fl":
        split, wire, k = last, "fp32", 1
    else:
        wire, _, kk = variant.partition("/k")
        split, k = args.split, int(kk or 1)
    gen = torch.Generator().manual_seed(args.seed)
    schedule = TrainingConfig(rounds=args.rounds, lr=args.lr)  # the runtime's: lr x 0.1 from half the rounds on
    history = []
    for r in range(args.rounds):
        states, weights = [], []
        for i, part in enumerate(shards):
            local = copy.deepcopy(model)
            local.train()
            opt = torch.optim.SGD(local.parameters(), lr=schedule.lr_for_round(r), momentum=0.9)
            device, server = split_model(local, split)
            order = torch.Generator().manual_seed(args.seed * 100_003 + r * 1009 + i)
            loader = torch.utils.data.DataLoader(part, batch_size=args.batch, shuffle=True, generator=order)
            for step, (x, y) in enumerate(loader):
                if args.max_steps and step >= args.max_steps:
                    break
                opt.zero_grad(set_to_none=True)
                if split == last:
                    nn.functional.cross_entropy(local(x), y).backward()
                else:
                    split_step(device, server, x, y, wire, min(k, len(y)), gen)
                opt.step()
            states.append({n: t.detach().clone() for n, t in local.state_dict().items()})
            weights.append(len(part))
        model.load_state_dict(fedavg(states, weights))
        history.append(accuracy(model, data.test))
        print(f"  {variant}: round {r}: accuracy {history[-1]:.4f}", flush=True)
    return history


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="fl,fp32/k1,fp16/k1,int8/k4",
                   help="comma-separated: fl, or CODEC/kK (CODEC fp32|fp16|int8, K 1..8) at --split")
    p.add_argument("--split", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=0, help="per device and round (0: the whole shard)")
    p.add_argument("--train", type=int, default=5000, help="synthetic training samples, all devices together")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(DataConfig(name="synthetic", synthetic_train=args.train, synthetic_test=args.test, seed=args.seed))
    shards = [shard(data, i, args.devices, "iid", 0.5, args.seed) for i in range(args.devices)]
    print(f"synthetic (harder set) {args.train}/{args.test}, {args.devices} devices, {args.rounds} rounds, "
          f"batch {args.batch}, split {args.split}", flush=True)
    results = {}
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
        started = time.perf_counter()
        results[v] = {"accuracy": run(v, args, data, shards), "wall_s": time.perf_counter() - started}
    base = results.get("fl", next(iter(results.values())))["accuracy"][-1]
    print(f"{'variant':10} {'final':>7} {'best':>7} {'pts vs fl':>9} {'wall s':>7}")
    for v, res in results.items():
        acc = res["accuracy"]
        print(f"{v:10} {acc[-1] * 100:6.1f}% {max(acc) * 100:6.1f}% {(acc[-1] - base) * 100:+9.1f} {res['wall_s']:7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
