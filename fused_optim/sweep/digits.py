"""The example that needs no download: scikit-learn's bundled digits
(1,797 8x8 grey images of the digits 0-9; ``sklearn.datasets.load_digits``),
a small CNN and an MLP for them, and the question's search space: SGD,
momentum, Nesterov, Adagrad, RMSprop, Adam and AdamW over a grid of
learning rates."""

from __future__ import annotations

import torch
from torch import nn

from fused_optim.sweep.space import grid

# The seven optimizers users ask about, each over a learning-rate grid that
# spans too small to too large for it (Adam-like methods need lrs about 100x
# smaller than SGD's).
OPTIMIZER_FAMILIES = [
    ({"optimizer": "SGD"}, [0.01, 0.03, 0.1, 0.3, 1.0]),
    ({"optimizer": "SGD", "momentum": 0.9}, [0.003, 0.01, 0.03, 0.1, 0.3]),
    ({"optimizer": "SGD", "momentum": 0.9, "nesterov": True}, [0.003, 0.01, 0.03, 0.1, 0.3]),
    ({"optimizer": "Adagrad"}, [0.003, 0.01, 0.03, 0.1, 0.3]),
    ({"optimizer": "RMSprop"}, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    ({"optimizer": "Adam"}, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    ({"optimizer": "AdamW", "weight_decay": 0.01}, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
]


def optimizer_space(lrs_per_family: int = 5) -> list[dict]:
    """7 optimizers x ``lrs_per_family`` learning rates (the middle ones
    when fewer than 5)."""
    configs = []
    for base, lrs in OPTIMIZER_FAMILIES:
        start = (len(lrs) - lrs_per_family) // 2
        configs += grid(base, lr=lrs[start:start + lrs_per_family])
    return configs


def load(val_fraction: float = 0.25, seed: int = 0, dtype=torch.float32):
    """((x_train, y_train), (x_val, y_val)): images (N, 1, 8, 8) scaled to
    [0, 1], a stratified split with ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    train_index, val_index = [], []
    for label in range(10):
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_index.append(members[:n_val])
        train_index.append(members[n_val:])
    train_index, val_index = torch.cat(train_index), torch.cat(val_index)
    return (x[train_index], y[train_index]), (x[val_index], y[val_index])


def cnn() -> nn.Module:
    """Two 3x3 convolutions (16, 32 channels), max-pooling to 2x2, and a
    linear classifier: 6,090 params."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(), nn.Linear(128, 10),
    )


def mlp() -> nn.Module:
    """64-64-64-10 with ReLU (the benchmark's MLP): 8,970 params."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    )


MODELS = {"cnn": cnn, "mlp": mlp}
