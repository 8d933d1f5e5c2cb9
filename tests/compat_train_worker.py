"""Test-only: byol-pytorch README's ``train.py`` with the import changed, sized for CPU tests.

    torchrun --standalone --nproc_per_node 2 tests/compat_train_worker.py OUT

Writes ``OUT/rank{r}.pt``: the network's final state_dict on this rank.
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbyol.compat.byol_pytorch import BYOLTrainer, MockDataset  # noqa: E402


def main(out: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    trainer = BYOLTrainer(net, dataset=MockDataset(16, 32), image_size=16, hidden_layer=-2, learning_rate=3e-4,
                          num_train_steps=3, batch_size=8, checkpoint_every=2, checkpoint_folder=out, device="cpu",
                          byol_kwargs=dict(projection_size=16, projection_hidden_size=32, kernels="torch"))
    trainer()
    torch.save(net.state_dict(), os.path.join(out, f"rank{os.environ.get('RANK', 0)}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
