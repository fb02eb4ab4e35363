"""The data loop of the backpropagated diagonals: batches and micro-batches combined exactly, the
loss's reduction, bad input, and two gloo ranks giving the single-process diagonal."""

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hessian_eigenthings import ggn_diagonal, hesscale_diagonal
from helpers import batches, classification_data, small_mlp

F = nn.functional
METHODS = {
    "hesscale": lambda model, loader, loss, **kw: hesscale_diagonal(model, loader, loss, verbose=False, **kw),
    "ggn_exact": lambda model, loader, loss, **kw: ggn_diagonal(model, loader, loss, verbose=False, **kw),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_batches_and_micro_batches_give_the_whole_dataset_result(method):
    model = small_mlp()
    x, y = classification_data(num=90, din=10, classes=4)
    whole = METHODS[method](model, [(x, y)], F.cross_entropy)
    split = METHODS[method](model, batches(x, y, [50, 33, 7]), F.cross_entropy, max_possible_gpu_samples=16)
    assert torch.allclose(split.diagonal, whole.diagonal, rtol=1e-12, atol=1e-16)
    assert split.info["num_samples"] == 90


def test_a_summing_function_is_recognised_and_scaled():
    model = small_mlp()
    x, y = classification_data(num=60, din=10, classes=4)
    mean = ggn_diagonal(model, batches(x, y, [40, 20]), F.cross_entropy, verbose=False)
    summed = ggn_diagonal(model, batches(x, y, [40, 20]), lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                          verbose=False)
    assert summed.info["reduction"] == "sum"
    assert torch.allclose(summed.diagonal, 60 * mean.diagonal, rtol=1e-12)


def test_a_zero_loss_is_taken_as_a_mean_with_a_warning(caplog):
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        target = model(x)
    with caplog.at_level("WARNING", logger="hessian_eigenthings"):
        result = hesscale_diagonal(model, [(x, target)], lambda o, t: ((o - t) ** 2).mean(), verbose=False)
    assert "cannot be told" in caplog.text
    expected_weight = (2 / 16) * (x**2).sum(dim=0)  # d/dW_ij^2 of mean (o - t)^2 over 8 x 2 entries
    assert torch.allclose(result.info["by_parameter"]["0.weight"][0], expected_weight, rtol=1e-12)


@pytest.mark.parametrize("bad, error, match", [
    (lambda: ([], F.cross_entropy), ValueError, "empty"),
    (lambda: ([(torch.zeros(0, 10, dtype=torch.float64), torch.zeros(0, dtype=torch.long))], F.cross_entropy),
     ValueError, "empty"),
    (lambda: ([(torch.randn(4, 10, dtype=torch.float64),)], F.cross_entropy), TypeError, "inputs, targets"),
    (lambda: ([(torch.randn(4, 10, dtype=torch.float64), torch.zeros(4, dtype=torch.long))], "loss"),
     TypeError, "callable"),
    (lambda: ([(torch.randn(4, 10, dtype=torch.float64), torch.zeros(4, dtype=torch.long))],
              lambda o, t: F.cross_entropy(o, t, reduction="sum") ** 2), ValueError, "neither a mean nor a sum"),
    (lambda: ([(torch.randn(4, 10, dtype=torch.float64), torch.zeros(4, dtype=torch.long))],
              lambda o, t: F.cross_entropy(o, t) ** 2), ValueError, "couples different samples"),
])
def test_bad_input_is_refused_clearly(bad, error, match):
    loader, loss = bad()
    with pytest.raises(error, match=match):
        ggn_diagonal(small_mlp(), loader, loss, verbose=False)


# -- two ranks over gloo ---------------------------------------------------------------------------
def _rank_entry(rank: int, folder: str, fail: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = small_mlp()
        x, y = classification_data(num=90, din=10, classes=4)
        shard = batches(x[:50], y[:50], [30, 20]) if rank == 0 else batches(x[50:], y[50:], [40])
        if fail and rank == 1:
            shard = [(x[50:], y[50:60])]  # a batch whose inputs and targets disagree
        out = {name: run(model, shard, F.cross_entropy).diagonal for name, run in METHODS.items()}
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out = {"error": type(exc).__name__, "trace": traceback.format_exc()}
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True])
def test_two_ranks_give_the_single_process_diagonal_and_fail_together(tmp_path, fail):
    mp.start_processes(_rank_entry, args=(str(tmp_path), fail), nprocs=2, join=True, start_method="spawn")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    if fail:
        assert all("error" in out for out in outs), outs
        return
    assert not any("error" in out for out in outs), outs
    model = small_mlp()
    x, y = classification_data(num=90, din=10, classes=4)
    for name, run in METHODS.items():
        whole = run(model, [(x, y)], F.cross_entropy).diagonal
        for out in outs:
            assert torch.allclose(out[name], whole, rtol=1e-10), name
