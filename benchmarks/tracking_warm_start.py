"""Products per tracked step: the tracker's warm start against cold solves and power iteration.

    python benchmarks/tracking_warm_start.py                 # digits MLP, GD lr 0.2, 400 steps, every 20
    python benchmarks/tracking_warm_start.py --k 1 3 5 --every 10

Trains the digits MLP of example/track_sharpness.py with full-batch GD (it reaches the edge of
stability around step 100), keeps the parameters of every tracked step, then replays them through
SharpnessTracker with each solver configuration and prints, per configuration, the Hessian-vector
products of the tracked steps after the first (mean and max), their total time, and the largest
relative eigenvalue error against a cold ARPACK solve at tol 1e-10. This is the measurement behind
the default solver of hessian_eigenthings.tracking (see tracking/solve.py).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch import nn

from hessian_eigenthings import SharpnessTracker, deflated_power_iteration, lanczos


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs - targets).pow(2).sum(dim=1).mean()


def lanczos_cold(operator, num_eigenthings, which, tol):
    return lanczos(operator, num_eigenthings, which=which, tol=tol, verbose=False)


def lanczos_cold_short(operator, num_eigenthings, which, tol):
    return lanczos(operator, num_eigenthings, which=which, tol=tol, num_lanczos_vectors=num_eigenthings + 4,
                   max_steps=500, verbose=False)


def power_cold(operator, num_eigenthings, which, tol):
    return deflated_power_iteration(operator, num_eigenthings, power_iter_steps=5000, power_iter_err_threshold=tol,
                                    which=which, verbose=False)


CONFIGS = [
    ("tracker default: lanczos, warm", "lanczos"),
    ("lanczos, cold, default basis", lanczos_cold),
    ("lanczos, cold, basis k+4", lanczos_cold_short),
    ("power_iter, warm (init_vecs)", "power_iter"),
    ("power_iter, cold", power_cold),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("hessian_eigenthings").setLevel(logging.ERROR)  # cold configs warn that they are cold

    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = nn.functional.one_hot(torch.tensor(data.target), 10).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    states = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            states.append({name: t.clone() for name, t in model.state_dict().items()})
        optimizer.zero_grad()
        half_squared_error(model(x), y).backward()
        optimizer.step()

    print(f"digits MLP, full-batch GD lr={args.lr:g} (2/lr = {2 / args.lr:g}), {len(states)} tracked steps "
          f"every {args.every}, tol={args.tol:g}; products of the tracked steps after the first")
    for k in args.k:
        references = []
        probe = SharpnessTracker(model, [(x, y)], half_squared_error, num_eigenthings=k, builtin_extras=())
        for state in states:
            model.load_state_dict(state)
            references.append(lanczos(probe.hessian, k, which="LA", tol=1e-10, verbose=False).eigenvalues)
        print(f"\nk = {k} (sharpness from {references[0][0]:.3f} to {references[-1][0]:.3f})")
        print(f"{'configuration':<34} {'mean':>7} {'max':>5} {'first':>6} {'seconds':>8} {'max rel err':>12}")
        for name, solver in CONFIGS:
            tracker = SharpnessTracker(model, [(x, y)], half_squared_error, num_eigenthings=k, solver=solver,
                                       tol=args.tol, builtin_extras=())
            errors, start = [], time.perf_counter()
            for step, (state, reference) in enumerate(zip(states, references)):
                model.load_state_dict(state)
                record = tracker.step(step)
                errors.append(np.max(np.abs(np.array(record.eigenvalues) - reference) / abs(reference[0])))
            seconds = time.perf_counter() - start
            later = [r.products for r in tracker.records[1:]]
            print(f"{name:<34} {np.mean(later):>7.1f} {max(later):>5d} {tracker.records[0].products:>6d} "
                  f"{seconds:>8.2f} {max(errors):>12.1e}")


if __name__ == "__main__":
    main()
