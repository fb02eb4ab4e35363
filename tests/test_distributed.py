"""torch.distributed: two CPU ranks over gloo, each with an uneven shard of the data, must give the
single-process products, eigenpairs and traces of the Hessian over the whole dataset; a rank that
fails must not leave the other waiting forever.

Each multi-process test spawns 2 processes (torch.multiprocessing, a file-based rendezvous in
tmp_path, a collective timeout) that run a list of checks and save what they saw with torch.save;
the assertions run here, against the dense Hessian of the session fixture ``mlp_problem``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hessian_eigenthings import (
    GGNOperator,
    HVPOperator,
    deflated_power_iteration,
    distributed,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
)
from hessian_eigenthings.operators.model_operator import NonFiniteError
from hessian_eigenthings.solvers.result import random_vectors
from hessian_eigenthings.utils import progress
from helpers import (
    abs_cosines,
    assert_model_unchanged,
    batches,
    classification_data,
    dense_loss_hessian,
    model_snapshot,
    small_mlp,
)

F = nn.functional
WORLD = 2
# Uneven shards of the 512 samples of classification_data(): rank 0 holds 0:300, rank 1 300:512.
SHARD_STARTS = (0, 300)
SHARD_BATCHES = ([256, 44], [150, 62])
# The default group waits long (a loaded CI machine may stall a rank for seconds); the failure
# checks run on a subgroup with a short timeout, so that any wait for a timeout shows.
DEFAULT_TIMEOUT_S = 60.0
SHORT_TIMEOUT_S = 5.0


# -- running ranks -----------------------------------------------------------------------------
def _entry(rank: int, worker_name: str, folder: str, backend: str) -> None:
    """One rank: join the group, run the worker, save what it returned (or its traceback)."""
    torch.set_num_threads(1)  # two ranks share two cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S),
    )
    try:
        out = globals()[worker_name](rank)
    except BaseException:  # noqa: BLE001  (reported to the test, which fails on it)
        out = {"crash": traceback.format_exc()}
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def _run_ranks(worker_name: str, folder: Path, limit_s: float, backend: str = "gloo") -> list[dict]:
    """Run ``worker_name`` on 2 spawned ranks; fail (and kill them) if they take over ``limit_s``."""
    context = mp.spawn(_entry, args=(worker_name, str(folder), backend), nprocs=WORLD, join=False)
    deadline = time.monotonic() + limit_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {WORLD} ranks of {worker_name} did not finish within {limit_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    outs = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for rank, out in enumerate(outs):
        assert "crash" not in out, f"rank {rank} crashed:\n{out['crash']}"
    return outs


def _shard(rank: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    x, y = classification_data()
    start, sizes = SHARD_STARTS[rank], SHARD_BATCHES[rank]
    xs, ys = x[start : start + sum(sizes)], y[start : start + sum(sizes)]
    return xs, ys, batches(xs, ys, sizes)


def _count_calls(name: str) -> list[int]:
    """Count calls of torch.distributed.<name> from now on (this process only)."""
    counter = [0]
    original = getattr(dist, name)

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    setattr(dist, name, counted)
    return counter


@contextlib.contextmanager
def _one_thread():
    """Run the parent's own references on one thread: on an oversubscribed CI machine the ranks
    and other jobs share the cores, and a multi-threaded torch then crawls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- workers (run inside the spawned ranks) ----------------------------------------------------
def _agreement_worker(rank: int) -> dict:
    model = small_mlp()
    xs, ys, loader = _shard(rank)
    # Micro-batching on one rank only: the reduction must not care how a rank splits its shard.
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=100 if rank else 10**6)
    bar = progress(total=3, leave=False)
    out: dict = {"bar_disabled": bar.disable}
    bar.close()
    block = torch.randn(op.size, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reduces = _count_calls("all_reduce")
    out["block"] = op.apply_block(block)
    out["all_reduces_per_product"] = reduces[0]
    out["num_samples"] = op.num_samples

    broadcasts = _count_calls("broadcast")
    out["random"] = random_vectors(op, 2, seed=None)
    out["broadcasts"] = broadcasts[0]

    res = lanczos(op, num_eigenthings=4, tol=1e-10, seed=None, verbose=False)
    out["lanczos"] = (res.eigenvalues, res.eigenvectors, res.residuals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few steps on purpose: agreement, not convergence, is checked
        res = deflated_power_iteration(op, num_eigenthings=2, power_iter_steps=40, seed=None, verbose=False)
    out["power"] = (res.eigenvalues, res.eigenvectors, res.residuals)

    probes = torch.randint(0, 2, (op.size, 16), generator=torch.Generator().manual_seed(11)).double() * 2 - 1
    out["hutchinson"] = float((probes * op.apply_block(probes)).sum(0).mean())
    # The library's estimators: fixed seeds (compared with a single process) and seed=None
    # (rank 0's seed, broadcast), which must still give every rank the same numbers.
    out["trace_fixed"] = hutchinson_trace(op, max_products=32, seed=5, verbose=False).estimate
    estimate = hutchpp_trace(op, max_products=30, seed=None, verbose=False)
    out["trace_hutchpp"] = (estimate.estimate, estimate.std_error)
    density = spectral_density(op, num_probes=2, num_steps=15, seed=None, verbose=False)
    out["density"] = (density.ritz_values, density.weights, density.density)
    out["density_fixed"] = spectral_density(op, num_probes=2, num_steps=15, seed=4, verbose=False).ritz_values
    # Every model operator reduces over the ranks, not only the HVP.
    out["ggn_block"] = GGNOperator(model, loader, F.cross_entropy, use_gpu=False).apply_block(block)
    # A summing loss: the shards' sums are added, not averaged (a loss module, and a function found to sum).
    out["sum_block"] = HVPOperator(model, loader, nn.CrossEntropyLoss(reduction="sum"), use_gpu=False,
                                   max_possible_gpu_samples=100 if rank else 10**6).apply_block(block)
    summing = HVPOperator(model, loader, lambda o, t: F.cross_entropy(o, t, reduction="sum"), use_gpu=False)
    out["found_sum_block"] = summing.apply_block(block)
    out["found_reduction"] = summing.reduction

    stochastic = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, full_dataset=False)
    out["stochastic"] = [stochastic.apply(block[:, 0]), stochastic.apply(block[:, 0])]

    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    before = model_snapshot(ddp.module)
    out["ddp_block"] = HVPOperator(ddp, loader, F.cross_entropy, use_gpu=False).apply_block(block)
    assert_model_unchanged(ddp.module, before)
    # DDP still trains afterwards, and its gradient all-reduce is its own: the mean of the shards' gradients.
    F.cross_entropy(ddp(xs), ys).backward()
    out["ddp_grad"] = torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])
    return out


def _failure_worker(rank: int) -> dict:
    model = small_mlp()
    xs, ys, loader = _shard(rank)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    out: dict = {}
    short = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))

    def attempt(name: str, operator: HVPOperator, vec: torch.Tensor = None) -> None:
        operator.process_group = short
        start = time.monotonic()
        try:
            out[name] = ("ok", operator.apply(vec) if vec is not None else operator.loss_and_gradient())
        except Exception as exc:  # noqa: BLE001
            out[name] = (type(exc).__name__, str(exc))
        out[name + "_seconds"] = time.monotonic() - start

    bad_x = xs.clone()
    bad_x[5, 0] = float("nan")
    nan_loader = batches(bad_x, ys, SHARD_BATCHES[rank]) if rank == 1 else loader
    attempt("nan", HVPOperator(model, nan_loader, F.cross_entropy, use_gpu=False), v)

    broken = loader + [(xs[:3], ys[:3], "extra")] if rank == 1 else loader
    attempt("bad_batch", HVPOperator(model, broken, F.cross_entropy, use_gpu=False), v)

    def loss_failing_on_rank_1(outputs, targets):
        if rank == 1:
            raise RuntimeError("the loss failed on rank 1")
        return F.cross_entropy(outputs, targets)

    # The loss and gradient go through the same guard as the products.
    attempt("gradient", HVPOperator(model, loader, loss_failing_on_rank_1, use_gpu=False))

    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    attempt("other_vectors", op, v + rank)
    attempt("healthy", op, v)  # the group survived all of the above
    attempt("healthy_gradient", op)

    rank_local = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    rank_local.reduce_across_ranks = False
    attempt("rank_local", rank_local, v)

    # Rank 1 fails outside any product and stops answering; rank 0's next product must not wait forever.
    if rank == 1:
        time.sleep(SHORT_TIMEOUT_S + 1)
    else:
        attempt("peer_gone", op, v)
    return out


def _tracker_worker(rank: int) -> dict:
    from hessian_eigenthings import SharpnessTracker

    model = small_mlp()
    _, _, loader = _shard(rank)
    log_path = os.environ["HE_TRACKER_LOG"]
    tracker = SharpnessTracker(model, loader, nn.functional.cross_entropy, num_eigenthings=2, log_path=log_path,
                               use_gpu=False, verbose=False)
    records = [tracker.step(0)]
    with torch.no_grad():
        model[0].weight.mul_(1.01)
    records.append(tracker.step(1))
    return {"records": [r.as_dict() for r in records]}


def _nccl_worker(rank: int) -> dict:
    model = small_mlp().to(f"cuda:{rank}")
    _, _, loader = _shard(rank)  # batches stay on the host; the operator moves them
    block = torch.randn(model_size(model), 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    op = HVPOperator(model, loader, F.cross_entropy)
    out = {"block": op.apply_block(block.to(op.device)).cpu(), "device": str(op.device)}
    # A CPU operator under NCCL: the reduction moves its buffer to this rank's GPU and back.
    cpu_op = HVPOperator(small_mlp(), loader, F.cross_entropy, device="cpu")
    out["cpu_block"] = cpu_op.apply_block(block)
    out["random"] = random_vectors(op, 2, seed=None).cpu()
    res = lanczos(op, num_eigenthings=3, tol=1e-10, seed=None, verbose=False)
    out["lanczos"] = res.eigenvalues
    return out


def model_size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- tests -------------------------------------------------------------------------------------
def test_two_ranks_with_uneven_shards_match_the_single_process_hessian(mlp_problem, tmp_path):
    model, loader, x, y, hessian = mlp_problem
    ranks = _run_ranks("_agreement_worker", tmp_path, limit_s=180)
    block = torch.randn(hessian.shape[0], 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = hessian @ block
    scale = expected.abs().max()

    # Only rank 0 draws a progress bar.
    assert [out["bar_disabled"] for out in ranks] == [False, True]
    for out in ranks:
        # The product of the Hessian over all 512 samples, from 300 + 212 samples in unequal batches.
        assert torch.allclose(out["block"], expected, rtol=1e-10, atol=1e-12 * scale)
        assert out["num_samples"] == 512
        assert out["all_reduces_per_product"] == 1  # one collective for the product, count and checks
        assert torch.allclose(out["ddp_block"], out["block"], rtol=1e-12, atol=1e-14 * scale)
    r0, r1 = ranks
    # Bitwise the same on both ranks: the same products and the same arithmetic.
    assert torch.equal(r0["block"], r1["block"])
    assert torch.equal(r0["random"], r1["random"]) and r0["broadcasts"] == 1
    for key in ("lanczos", "power"):
        for a, b in zip(r0[key], r1[key]):
            assert np.array_equal(np.asarray(a), np.asarray(b)), key
    assert r0["hutchinson"] == r1["hutchinson"]

    # Lanczos eigenpairs: the dense Hessian's and the single-process run's.
    with _one_thread():
        all_vals, all_vecs = torch.linalg.eigh(hessian)
        single = lanczos(HVPOperator(model, loader, F.cross_entropy, use_gpu=False), num_eigenthings=4, tol=1e-10,
                         verbose=False)
    top = torch.argsort(all_vals.abs(), descending=True)[:4]
    exact_vals, exact_vecs = all_vals[top].numpy(), all_vecs[:, top].T.numpy()
    vals, vecs, residuals = r0["lanczos"]
    assert np.allclose(vals, exact_vals, rtol=1e-9, atol=0)
    assert np.all(abs_cosines(vecs, exact_vecs) > 1 - 1e-8)
    assert np.allclose(vals, single.eigenvalues, rtol=1e-9, atol=0)
    assert np.all(abs_cosines(vecs, single.eigenvectors) > 1 - 1e-8)
    # Power iteration from a random (broadcast) start: each value lies within its residual of the spectrum.
    all_vals = all_vals.numpy()
    vals, _, residuals = r0["power"]
    for val, res in zip(vals, residuals):
        assert np.min(np.abs(all_vals - val)) <= res * (1 + 1e-9) + 1e-12

    # Hutchinson's estimate with fixed probes: the single-process number.
    probes = torch.randint(0, 2, (hessian.shape[0], 16), generator=torch.Generator().manual_seed(11)).double() * 2 - 1
    dense_trace = float((probes * (hessian @ probes)).sum(0).mean())
    assert r0["hutchinson"] == pytest.approx(dense_trace, rel=1e-10)
    # ... and the library's own estimators: identical on both ranks, and with a fixed seed the
    # single-process numbers on the whole dataset.
    for key in ("trace_hutchpp", "density"):
        for a, b in zip(r0[key], r1[key]):
            assert np.array_equal(np.asarray(a), np.asarray(b)), key
    assert r0["trace_fixed"] == r1["trace_fixed"]
    with _one_thread():
        whole = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
        single_trace = hutchinson_trace(whole, max_products=32, seed=5, verbose=False).estimate
        single_ritz = spectral_density(whole, num_probes=2, num_steps=15, seed=4, verbose=False).ritz_values
        ggn = GGNOperator(model, loader, F.cross_entropy, use_gpu=False).apply_block(block)
    assert r0["trace_fixed"] == pytest.approx(single_trace, rel=1e-10)
    assert np.allclose(r0["density_fixed"], single_ritz, rtol=1e-8, atol=1e-10 * np.abs(single_ritz).max())
    for out in ranks:
        assert torch.allclose(out["ggn_block"], ggn, rtol=1e-10, atol=1e-12 * ggn.abs().max())
        # the Hessian of the summed loss over all 512 samples is 512 times that of the mean
        for key in ("sum_block", "found_sum_block"):
            assert torch.allclose(out[key], 512 * expected, rtol=1e-10, atol=1e-12 * 512 * scale), key
        assert out["found_reduction"] == "sum"

    # One mini-batch per rank per product, weighted by their sizes: the Hessian over their union
    # (the single-process product on the union, itself checked against dense Hessians in test_hvp).
    v = block[:, 0]
    for step, (a, b) in enumerate([(slice(0, 256), slice(300, 450)), (slice(256, 300), slice(450, 512))]):
        union = [(torch.cat([x[a], x[b]]), torch.cat([y[a], y[b]]))]
        with _one_thread():
            want = HVPOperator(model, union, F.cross_entropy, use_gpu=False).apply(v)
        for out in ranks:
            assert torch.allclose(out["stochastic"][step], want, rtol=1e-10, atol=1e-12 * want.abs().max())

    # DDP's own gradient all-reduce still works after the products: the mean of the shards' gradients.
    grads = []
    for start, size in ((0, 300), (300, 212)):
        probe = copy.deepcopy(model)
        with _one_thread():
            F.cross_entropy(probe(x[start : start + size]), y[start : start + size]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in probe.parameters()]))
    mean_grad = (grads[0] + grads[1]) / 2
    for out in ranks:
        assert torch.allclose(out["ddp_grad"], mean_grad, rtol=1e-10, atol=1e-14)


def test_a_failing_rank_stops_every_rank_and_never_hangs(mlp_problem, tmp_path):
    model, loader, x, y, hessian = mlp_problem
    started = time.monotonic()
    r0, r1 = _run_ranks("_failure_worker", tmp_path, limit_s=180)
    assert time.monotonic() - started < 60

    # A NaN in rank 1's data: NonFiniteError on both ranks (rank 1 names its batch, rank 0 the rank).
    assert r1["nan"][0] == "NonFiniteError" and "batch 0" in r1["nan"][1]
    assert r0["nan"][0] == "NonFiniteError" and "Rank 1" in r0["nan"][1]
    # A malformed batch on rank 1: its own TypeError there, a DistributedError naming it on rank 0.
    assert r1["bad_batch"][0] == "TypeError" and "Batch 2" in r1["bad_batch"][1]
    assert r0["bad_batch"][0] == "DistributedError" and "Rank 1 raised" in r0["bad_batch"][1]
    # A loss that raises on rank 1 while the ranks compute the loss and its gradient: both raise, none waits.
    assert r1["gradient"] == ("RuntimeError", "the loss failed on rank 1")
    assert r0["gradient"][0] == "DistributedError" and "Rank 1 raised" in r0["gradient"][1]
    assert r0["gradient_seconds"] < SHORT_TIMEOUT_S and r1["gradient_seconds"] < SHORT_TIMEOUT_S
    # Different vectors on the two ranks: refused on both.
    for out in (r0, r1):
        assert out["other_vectors"][0] == "DistributedError" and "different vectors" in out["other_vectors"][1]
        assert out["nan_seconds"] < SHORT_TIMEOUT_S and out["bad_batch_seconds"] < SHORT_TIMEOUT_S
    # After all that the group still works and gives the global product.
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = hessian @ v
    loss = F.cross_entropy(model(x), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    for out in (r0, r1):
        assert out["healthy"][0] == "ok"
        assert torch.allclose(out["healthy"][1], want, rtol=1e-10, atol=1e-12 * want.abs().max())
        # the loss and gradient over both shards: the single-process ones
        assert out["healthy_gradient"][0] == "ok"
        assert out["healthy_gradient"][1][0] == pytest.approx(loss.item(), rel=1e-12)
        assert torch.allclose(out["healthy_gradient"][1][1], grad, rtol=1e-10, atol=1e-13)
    # reduce_across_ranks=False: each rank's own shard.
    for rank, out in enumerate((r0, r1)):
        start, size = SHARD_STARTS[rank], sum(SHARD_BATCHES[rank])
        shard = [(x[start : start + size], y[start : start + size])]
        with _one_thread():
            local = HVPOperator(model, shard, F.cross_entropy, use_gpu=False).apply(v)
        assert torch.allclose(out["rank_local"][1], local, rtol=1e-10, atol=1e-12 * local.abs().max())
    # Rank 1 stopped answering: rank 0 gets a clear error once the collective timeout passes.
    kind, message = r0["peer_gone"]
    assert kind == "DistributedError", message
    assert "Another rank probably raised" in message and "timeout=" in message
    assert SHORT_TIMEOUT_S - 1 < r0["peer_gone_seconds"] < SHORT_TIMEOUT_S + 10


# -- single process: everything is an identity ---------------------------------------------------
def test_tracker_under_two_ranks_writes_once_and_records_global_values(tmp_path, monkeypatch):
    log_path = tmp_path / "sharpness.jsonl"
    monkeypatch.setenv("HE_TRACKER_LOG", str(log_path))  # inherited by the spawned ranks
    r0, r1 = _run_ranks("_tracker_worker", tmp_path, limit_s=180)
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in out["records"]] for out in (r0, r1)]
    assert timeless[0] == timeless[1]
    lines = log_path.read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone wrote, once per tracked step
    assert not (tmp_path / "sharpness.jsonl.vectors.pt.tmp").exists()
    # loss, gradient norm and eigenvalues are those of the whole dataset, not of one shard
    model = small_mlp()
    x, y = classification_data()
    for step, record in enumerate(r0["records"]):
        if step == 1:
            with torch.no_grad():
                model[0].weight.mul_(1.01)
        with _one_thread():
            loss = nn.functional.cross_entropy(model(x), y)
            grad = torch.autograd.grad(loss, list(model.parameters()))
            hessian = dense_loss_hessian(model, nn.functional.cross_entropy, x, y)
        assert record["loss"] == pytest.approx(float(loss.detach()), rel=1e-10)
        assert record["grad_norm"] == pytest.approx(float(torch.cat([g.reshape(-1) for g in grad]).norm()), rel=1e-9)
        top = np.sort(np.linalg.eigvalsh(hessian.numpy()))[::-1][:2]
        assert np.allclose(record["eigenvalues"], top, rtol=1e-4)


def test_without_a_process_group_the_helpers_do_nothing(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    assert not distributed.is_distributed()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main_process()
    t = torch.arange(5.0)
    assert distributed.broadcast(t) is t and distributed.all_reduce_sum(t) is t
    assert distributed.unwrap_model(model) is model
    guard = distributed.ProductGuard()
    assert not guard.active
    with pytest.raises(NonFiniteError):
        with guard:
            raise NonFiniteError("passes through")
    assert guard.reduce(t, 3, t) == (t, 3, None) and guard.reduce(t, 3, t, "sum") == (t, 3, "sum")
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    v = torch.ones(op.size, dtype=torch.float64)
    assert torch.allclose(op.apply(v), hessian @ v, rtol=1e-10, atol=1e-12)
    a, b = random_vectors(op, 2, None), random_vectors(op, 2, None)
    assert not torch.equal(a, b)  # fresh randomness stays fresh in a single process


@pytest.mark.parametrize("num,world", [(1797, 2), (10, 3), (512, 4), (2, 3), (0, 2)])
def test_shard_indices_cover_every_sample_once_as_evenly_as_possible(num, world):
    shards = [distributed.shard_indices(num, rank, world) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(num))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_indices_reject_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_indices(10, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        distributed.shard_indices(10, 0, 0)
    assert distributed.shard_indices(10) == range(10)  # one process holds everything


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_two_gpu_ranks_over_nccl_match_the_single_process_hessian(mlp_problem, tmp_path):
    _, _, _, _, hessian = mlp_problem
    r0, r1 = _run_ranks("_nccl_worker", tmp_path, limit_s=120, backend="nccl")
    block = torch.randn(hessian.shape[0], 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = hessian @ block
    assert (r0["device"], r1["device"]) == ("cuda:0", "cuda:1")
    for out in (r0, r1):
        for key in ("block", "cpu_block"):
            assert torch.allclose(out[key], expected, rtol=1e-9, atol=1e-11 * expected.abs().max()), key
    assert torch.equal(r0["random"], r1["random"])
    assert np.array_equal(r0["lanczos"], r1["lanczos"])
    with _one_thread():
        exact = torch.linalg.eigvalsh(hessian)
    top = exact[torch.argsort(exact.abs(), descending=True)[:3]].numpy()
    assert np.allclose(r0["lanczos"], top, rtol=1e-8, atol=0)


@pytest.mark.slow
def test_example_runs_under_torchrun_and_matches_a_single_process(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "example" / "distributed.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         "--compare", "--quiet", "--epochs", "2", "--k", "3", "--timeout", "60"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s), shards of [899, 898] samples" in proc.stdout
    assert "over 1797 samples" in proc.stdout
    assert "largest difference between ranks: 0\n" in proc.stdout
    rel = float(proc.stdout.split("largest relative difference ")[1].split()[0])
    assert rel <= 1e-6, proc.stdout  # both solves meet tol=1e-6
