"""Pipelined split steps through the real path: an `ares server` process, the device trainer,
its httpx HTTP/2 client with one stream per micro-batch. A batch sent as k micro-batches must
leave the same weights as the unsplit model trained on the same micro-batches (gradients
accumulated, each part's loss weighted by its share, one optimiser step)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ares.core.config import DeviceSettings
from ares.core.models import build_model
from ares.runtime.device import DeviceTrainer
from ares.runtime.link import HttpLink
from tests.support import small_config, token


def first_batch(trainer: DeviceTrainer, round_index: int):
    cfg = trainer.cfg
    gen = torch.Generator().manual_seed(cfg.training.seed * 100_003 + round_index * 1009 + cfg.shard_of("dev-a"))
    loader = torch.utils.data.DataLoader(trainer.shard, batch_size=cfg.training.batch_size, shuffle=True, generator=gen)
    return next(iter(loader))


ROUNDS = [(1, 4, "fp32"), (4, 3, "fp32"), (1, 4, "int8")]  # (split, micro-batches, codec) per round


def micro_batched_reference(cfg, start: dict, x, y, k: int, round_index: int) -> dict[str, torch.Tensor]:
    model = build_model(cfg.model, seed=cfg.training.seed).train()
    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.training.lr_for_round(round_index), momentum=cfg.training.momentum)
    opt.zero_grad()
    for xi, yi in zip(torch.tensor_split(x, k), torch.tensor_split(y, k)):
        (torch.nn.functional.cross_entropy(model(xi), yi) * (len(yi) / len(y))).backward()
    opt.step()
    return model.state_dict()


def test_pipelined_steps_match_unsplit_micro_batched_steps(tmp_path: Path, server_process):
    cfg = small_config(tmp_path, rounds=len(ROUNDS), batch_size=20, lr=0.05, momentum=0.9, max_steps_per_round=1)
    server = server_process(cfg.model_copy(update={"micro_batches": 2}))
    (tmp_path / "split").write_text("1\n")
    (tmp_path / "token").write_text(token(cfg, "dev-a"))
    settings = DeviceSettings(name="dev-a", server_url=server.url, token_file=str(tmp_path / "token"),
                              split_file=str(tmp_path / "split"))
    link = HttpLink(server.url, "dev-a", token(cfg, "dev-a"))
    ckpt = Path(cfg.checkpoint_dir) / "global.safetensors"
    try:
        trainer = DeviceTrainer(settings, link)
        assert trainer.micro_batches == 2  # the server's setting, unless the device overrides it
        state = build_model(cfg.model, seed=cfg.training.seed).state_dict()
        for r, (split, k, codec) in enumerate(ROUNDS):
            trainer.settings = settings.model_copy(update={"micro_batches": k, "codec": codec})
            x, y = first_batch(trainer, r)
            reply, weights, _ = link.join(r, split)
            entry = trainer.train_round(reply, weights)
            assert entry.uploaded and entry.steps == 1 and entry.up_s > 0 and entry.server_s > 0
            merged = load_file(str(ckpt))
            want = micro_batched_reference(cfg, state, x, y, k, r)
            worst = max(float((merged[key] - w).abs().max()) for key, w in want.items() if w.is_floating_point())
            for key, w in want.items():
                if not w.is_floating_point():
                    assert torch.equal(merged[key], w), f"round {r}: {key}"
            if codec == "fp32":
                assert worst <= 1e-5, f"round {r} (split {split}, k {k}): weights differ by {worst:.2e}"
            else:  # 8 bits each way: the step moves the weights almost as the exact one does
                moved = max(float((w - state[key]).abs().max()) for key, w in want.items() if w.is_floating_point())
                print(f"int8 pipelined step: largest weight deviation {worst:.2e}, largest weight change {moved:.2e}")
                assert worst < 0.05 * moved
            state = merged
        assert link.client.get("/healthz").http_version == "HTTP/2"
    finally:
        link.close()
