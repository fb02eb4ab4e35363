"""Track the sharpness of full-batch gradient descent on digits: it rises, then hovers at 2/lr.

    python example/track_sharpness.py                      # MLP, lr 0.2, 1000 steps, every 10: ~10 s on a CPU
    python example/track_sharpness.py --k 3 --lr 0.1 --steps 3000 --every 20
    python example/track_sharpness.py --model cnn --device cuda

Gradient descent with learning rate lr is stable on a quadratic only while the largest Hessian
eigenvalue (the sharpness) stays below 2/lr. Cohen et al. (2021, "Gradient descent on neural
networks typically occurs at the edge of stability") observed that, with full-batch GD, the
sharpness first rises ("progressive sharpening") and then hovers around 2/lr while the loss keeps
falling, non-monotonically. This script shows it: it trains on scikit-learn's bundled digits
(1797 images, nothing is downloaded) with a fixed learning rate, tracks the top Hessian
eigenvalue(s) over the whole training set every few steps with a warm-started SharpnessTracker,
and writes the log (sharpness.jsonl or .csv) and a plot with the 2/lr line (sharpness.png) to --out.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from hessian_eigenthings import SharpnessTracker, plot_log
from hessian_eigenthings.utils import progress
from common import HelpFormatter, checked_device, digits_dataset, make_mlp, require_positive  # example/common.py

LOSSES = ("mse", "ce")


class SmallCNN(nn.Module):
    """Two 3x3 convolutions on the 8x8 digit images, 2x2 average pooling, a linear classifier."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.head = nn.Linear(channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * ||outputs - one_hot||^2 per sample, averaged over the batch (the MSE of Cohen et al.)."""
    return 0.5 * (outputs - targets).pow(2).sum(dim=1).mean()


def make_problem(loss: str, device: torch.device, samples: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """The digits training set (all 1797, or the first ``samples``) on ``device`` as (inputs, targets, criterion)."""
    inputs, labels = digits_dataset().tensors
    inputs, labels = inputs[:samples], labels[:samples]
    if loss == "mse":
        return inputs.to(device), nn.functional.one_hot(labels, 10).float().to(device), half_squared_error
    return inputs.to(device), labels.to(device), nn.functional.cross_entropy


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lr", type=float, default=0.2, help="learning rate of gradient descent")
    parser.add_argument("--steps", type=int, default=1000, help="gradient descent steps")
    parser.add_argument("--every", type=int, default=10, help="track every this many steps")
    parser.add_argument("--k", type=int, default=1, help="number of top eigenvalues to track")
    parser.add_argument("--width", type=int, default=32, help="MLP hidden width / CNN channels")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="mlp or a small cnn")
    parser.add_argument("--loss", choices=LOSSES, default="mse",
                        help="mse (half squared error to one-hot) or ce (cross-entropy)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--samples", type=int, default=None, help="train on the first this many digits (None: all 1797)")
    parser.add_argument("--out", default=".", help="folder for sharpness.png and the log")
    parser.add_argument("--log-format", choices=["jsonl", "csv"], default="jsonl", help="log file format")
    parser.add_argument("--resume", action="store_true",
                        help="continue an existing log: GD is deterministic, so training reruns from step 0 and "
                             "only steps after the log's last are tracked; otherwise the log is overwritten")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (the model is tiny: extra threads only add overhead, a lot of "
                             "it on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("steps", "every", "k", "width", "threads", "samples"))
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> SharpnessTracker:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = checked_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    inputs, targets, criterion = make_problem(args.loss, device, args.samples)
    model = (make_mlp(args.width) if args.model == "mlp" else SmallCNN(args.width)).to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"sharpness.{args.log_format}"
    tracker = SharpnessTracker(
        model, [(inputs, targets)], criterion, every=args.every, num_eigenthings=args.k, log_path=log_path,
        if_exists="resume" if args.resume else "overwrite", device=device,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    threshold = 2.0 / args.lr
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model.upper()} with {n} parameters, full-batch GD on {len(inputs)} digits, lr={args.lr:g} "
          f"(2/lr = {threshold:.4g}), {args.loss} loss; top {args.k} eigenvalue(s) every {args.every} steps.")

    start = time.perf_counter()
    with tracker:  # releases the log (and its lock) when training ends, also on error
        bar = progress(range(args.steps + 1), desc="GD", verbose=not args.quiet)
        for step in bar:
            record = tracker.step(step)
            if record is not None:
                bar.set_postfix(sharpness=f"{record.sharpness:.4g}", loss=f"{record.extras['loss']:.4g}")
            if step == args.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs), targets)
            if not math.isfinite(loss.item()):
                print(f"Training diverged at step {step} (loss {loss.item()}); lower --lr.")
                break
            loss.backward()
            optimizer.step()
        bar.close()
    seconds = time.perf_counter() - start

    records = tracker.records
    figure_path = out / "sharpness.png"
    plot_log(log_path, figure_path, threshold=threshold, threshold_label=f"2/lr = {threshold:.4g}",
             title=f"{args.model.upper()} on digits, full-batch GD, lr = {args.lr:g}")
    sharp = [r.sharpness for r in records]
    warm = [r.products for r in records if r.warm]
    print(f"{seconds:.1f} s for {args.steps} steps and {len(records)} tracked steps.")
    print(f"sharpness: {sharp[0]:.4g} at step {records[0].step}, max {max(sharp):.4g}, "
          f"{sharp[-1]:.4g} at step {records[-1].step}; 2/lr = {threshold:.4g} (final / (2/lr) = "
          f"{sharp[-1] / threshold:.3f})")
    if warm:
        cold = [r.products for r in records if not r.warm]
        print(f"Hessian-vector products per tracked step: {sum(warm) / len(warm):.1f} warm-started"
              + (f", {sum(cold) / len(cold):.0f} cold" if cold else "") + ".")
    print(f"Wrote {log_path} and {figure_path}.")
    return tracker


if __name__ == "__main__":
    main()
