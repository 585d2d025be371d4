"""Small seeded networks and data sets shared by the test modules."""

import numpy as np
import torch
from torch import nn


def mlp(n_in=3, n_out=1, hidden=12, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def cnn(seed=0):
    """Conv2d(1, 4, 3) - Tanh - Flatten - Linear on (1, 8, 8) images: p = 185."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1)
    )


class TokenBag(nn.Module):
    """Embedding(20, 4) of each of a sample's integer tokens, averaged, then Tanh and
    Linear: a network that takes indices, not floats (p = 80 + 4·n_out + n_out)."""

    def __init__(self, n_out=1, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(20, 4)
        self.out = nn.Linear(4, n_out)

    def forward(self, tokens):
        return self.out(torch.tanh(self.embedding(tokens).mean(1)))


def token_data(n=30, m=20, length=5, n_outputs=1, seed=0):
    """(X, Y, X_test): integer token arrays (n, length) of 20 tokens, Y (n, n_outputs)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 20, size=(n, length))
    X_test = rng.integers(0, 20, size=(m, length))
    weights = rng.normal(size=(20, n_outputs))
    Y = np.tanh(weights[X].mean(1)) + 0.1 * rng.normal(size=(n, n_outputs))
    return X, Y, X_test


def batchnorm_dropout_net(seed=0):
    """Linear - BatchNorm1d - Tanh - Dropout - Linear, left in *train* mode.

    The running statistics are moved away from (0, 1) first, so that eval mode and
    train mode give clearly different outputs.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(3, 10),
        nn.BatchNorm1d(10),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(10, 1),
    )
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(2.0 * torch.randn(32, 3) + 1.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


class ReferenceTanh(torch.autograd.Function):
    """tanh with a hand-written backward and *no* jvp: forward-mode AD fails on it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return grad_output * (1 - output**2)


class NoJvpTanh(nn.Module):
    def forward(self, x):
        return ReferenceTanh.apply(x)


def no_jvp_net(n_out=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 10), NoJvpTanh(), nn.Linear(10, n_out))


def regression_data(n=30, m=20, n_features=3, n_outputs=1, image=False, seed=0):
    """(X, Y, X_test) with Y of shape (n, n_outputs) of scale about 1."""
    rng = np.random.default_rng(seed)
    shape = (1, 8, 8) if image else (n_features,)
    X = rng.normal(size=(n, *shape))
    X_test = rng.normal(size=(m, *shape))
    flat = X.reshape(n, -1)
    W = rng.normal(size=(flat.shape[1], n_outputs)) / np.sqrt(flat.shape[1])
    Y = np.sin(2.0 * flat @ W) + 0.1 * rng.normal(size=(n, n_outputs))
    return X, Y, X_test
