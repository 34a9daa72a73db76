"""Worker for tests/test_distributed.py: a tiny BN-free CNN trained through patchflannel's Trainer
on real JSRT radiographs (32², nodule vs no nodule), alone or under torchrun.

    python tests/ddp_worker.py RUN_DIR OUT.pt EPOCHS [KILL_AT_EPOCH]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchflannel.io import read_image, resize
from patchflannel.runtime import init_distributed
from patchflannel.training import LoopSettings, Trainer, epoch_batches, shard

torch.set_num_threads(1)
DATA = Path(os.environ.get("PATCHFLANNEL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "jsrt" / "images"


def main() -> None:
    run_dir, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    dist = init_distributed("cpu")
    files = sorted(DATA.glob("*.png"))[::8][:24]  # 24 real radiographs, both kinds
    x = torch.from_numpy(np.stack([resize(read_image(f), 32, "area") for f in files])).unsqueeze(1).float()
    y = torch.tensor([int(f.name.startswith("JPCLN")) for f in files])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(4 * 64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = {"train": {"epochs": epochs, "patience": 100}, "seed": 0, "n": len(files)}
    trainer = Trainer(model, opt, LoopSettings(epochs=epochs, patience=100, monitor="loss", mode="min"),
                      run_dir=run_dir, config=cfg, dist=dist, name="ddp-test")

    def step(m: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor, int]:
        idx = torch.as_tensor(shard(batch, dist))
        return F.cross_entropy(m(x[idx]), y[idx], reduction="sum"), len(idx)

    def validate(m: nn.Module) -> dict[str, float]:
        if kill_at and trainer.epoch + 1 == kill_at:
            os._exit(17)  # a crash in the middle of a run, after the previous epoch's checkpoint
        return {"loss": float(F.cross_entropy(m(x), y))}

    trainer.fit(lambda e: epoch_batches(len(files), 8, 0, e), step, validate, lambda m, _: None, len)
    state = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
    torch.save({"state": state, "epochs": trainer.epoch, "resumed": trainer.resumed, "rank": dist.rank,
                "world": dist.world}, out.with_name(f"{out.stem}_rank{dist.rank}.pt"))
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
