"""What the example scripts share: scikit-learn's digits, the small MLP they analyse, training it,
their common command-line options and the table of eigenpairs.

The scripts import it as ``common``: Python puts a script's own folder first on ``sys.path``, so
this works from any working directory (``python example/main.py`` or ``cd example && python main.py``).
The digits dataset ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Sequence

import torch
from torch import nn


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the script's docstring as written and shows every option's default."""


class CountingLoader:
    """A DataLoader that counts the passes made over it (an analysis on one object reads it once)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        self.passes = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


def solver_modes() -> list[str]:
    """The modes ``compute_hessian_eigenthings`` accepts, read from the library (not a copy)."""
    from hessian_eigenthings.solvers.registry import solver_names

    return list(solver_names())


def digits_dataset() -> torch.utils.data.TensorDataset:
    """The 1797 digits images (8x8, scaled to [0, 1]) and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            "The examples use scikit-learn's bundled digits dataset, and scikit-learn is not installed. "
            'Install the examples extra: pip install -e ".[examples]" (or: pip install scikit-learn matplotlib).'
        ) from None

    digits = load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    targets = torch.tensor(digits.target, dtype=torch.long)
    return torch.utils.data.TensorDataset(inputs, targets)


def digits_loaders(batch_size: int, device: str) -> torch.utils.data.DataLoader:
    """The digits dataset as a DataLoader in a fixed order (the batches stay on the CPU; ``device``
    is not used)."""
    return torch.utils.data.DataLoader(digits_dataset(), batch_size=batch_size, shuffle=False)


def make_mlp(width: int) -> nn.Module:
    """64 -> width -> width -> 10 with ReLUs: the classifier every example analyses."""
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def train(model: nn.Module, loader: torch.utils.data.DataLoader, epochs: int, device: torch.device) -> float:
    """A few epochs of Adam on cross-entropy; returns the last epoch's mean training loss.

    A DistributedDataParallel model (which averages the gradients over the ranks) trains under its
    ``join()``, so ranks whose shards give fewer batches finish an epoch early without a hang.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    total, count = 0.0, 0
    for _ in range(epochs):
        total, count = 0.0, 0
        with model.join() if distributed else contextlib.nullcontext():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(y)
                count += len(y)
    return total / max(count, 1)


def train_digits_mlp(
    width: int, epochs: int, batch_size: int, device: torch.device, seed: int
) -> tuple[nn.Module, torch.utils.data.DataLoader, int]:
    """Seed torch's global RNG, train ``make_mlp(width)`` on digits and print a line about it.

    Returns the trained model (on ``device``), the digits loader and the number of parameters.
    """
    torch.manual_seed(seed)
    loader = digits_loaders(batch_size, str(device))
    model = make_mlp(width).to(device)
    start = time.perf_counter()
    loss = train(model, loader, epochs, device)
    n = sum(p.numel() for p in model.parameters())
    print(f"Trained an MLP with {n} parameters on digits for {epochs} epochs "
          f"({time.perf_counter() - start:.1f} s), training loss {loss:.4f}.")
    return model, loader, n


def add_training_options(
    parser: argparse.ArgumentParser, *, device: bool = True, batch_size: int = 512, epochs: int = 20
) -> None:
    """Add ``--device`` (unless ``device`` is False), ``--batch-size``, ``--epochs`` and ``--width``
    with the given defaults."""
    if device:
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="batch size for training and products")
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs before the analysis")
    parser.add_argument("--width", type=int, default=32, help="hidden width of the MLP")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]) -> None:
    """Exit with a usage error for the first option among ``names`` (attribute names) that is set and
    not positive; an option left at None is skipped."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def checked_device(name: str) -> torch.device:
    """``torch.device(name)``, or a clear exit when it asks for CUDA on a machine without it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine.")
    return device


def print_eigenpairs(result: Any) -> None:
    """Print an :class:`EigenResult` as a table: eigenvalue, residual norm ``||Hv - lv||`` and the
    relative residual of each pair."""
    print(f"{'#':>3} {'eigenvalue':>14} {'||Hv - lv||':>12} {'relative':>10}")
    for i, (val, res, rel) in enumerate(zip(result.eigenvalues, result.residuals, result.relative_residuals)):
        print(f"{i:>3} {val:>14.6f} {res:>12.3e} {rel:>10.2e}")
