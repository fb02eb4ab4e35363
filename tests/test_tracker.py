"""SharpnessTracker: records checked against dense Hessians, the log file (formats, crash, resume),
the callback forms, extras, the Adam-preconditioned sharpness, solver choice, and bad input."""

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import SharpnessTracker, adam_preconditioner, deflated_power_iteration, read_log
from hessian_eigenthings.tracking import TrackingLog
from helpers import classification_data, dense_loss_hessian, exact_top, small_mlp

F = nn.functional
TOL = 1e-4


@pytest.fixture
def problem():
    """A float64 MLP with 196 parameters, 96 samples in two uneven batches."""
    x, y = classification_data(num=96)
    return small_mlp(width=8), [(x[:80], y[:80]), (x[80:], y[80:])], x, y


def gd_step(model, x, y, lr=0.5):
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(lr * g)


def exact_loss_and_grad_norm(model, x, y):
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.item(), float(torch.cat([g.reshape(-1) for g in grads]).norm())


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_records_match_the_dense_hessian(problem, which):
    model, loader, x, y = problem
    tracker = SharpnessTracker(model, loader, F.cross_entropy, every=2, num_eigenthings=3, which=which, tol=TOL)
    for step in range(5):
        record = tracker.step(step)
        assert (record is not None) == (step % 2 == 0)
        if record is not None:
            hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
            exact, _ = exact_top(hessian, 3, which)
            # a residual r bounds the distance to an eigenvalue by r, and r <= TOL * |lambda| here
            np.testing.assert_allclose(record.eigenvalues, exact, rtol=TOL, atol=0)
            assert all(record.converged) and record.products > 0 and record.which == which
            vecs = tracker.eigenvectors
            recomputed = torch.linalg.vector_norm(
                hessian @ vecs.T - vecs.T * torch.tensor(record.eigenvalues, dtype=torch.float64), dim=0)
            np.testing.assert_allclose(record.residuals, recomputed.numpy(), rtol=1e-6, atol=1e-13)
            loss, grad_norm = exact_loss_and_grad_norm(model, x, y)
            assert record.extras["loss"] == pytest.approx(loss, rel=1e-12)
            assert record.extras["grad_norm"] == pytest.approx(grad_norm, rel=1e-10)
        gd_step(model, x, y)
    assert [r.step for r in tracker.records] == [0, 2, 4]
    assert [r.warm for r in tracker.records] == [False, True, True]


def dropout_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 4)).double()


def train(track: bool, steps: int = 6):
    """Adam in train mode with dropout (the run draws from torch's RNG every step, and from random and
    numpy); with ``track`` a tracker measures the Adam-preconditioned sharpness every step, with a hook
    that draws from every global generator too."""
    x, y = classification_data(num=64)
    model = dropout_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def greedy_hook(ctx):
        return {"noise": float(torch.randn(()) + random.random() + np.random.rand())}

    if track:
        tracker = SharpnessTracker(model, [(x, y)], F.cross_entropy, every=1, num_eigenthings=2,
                                   preconditioner=optimizer, extras=greedy_hook)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model.train()
    for step in range(steps):
        if track:
            state = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state_dict()["state"].items()}
            snapshot = [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]
            grads = [p.grad for p in model.parameters()]
            record = tracker.step(step)
            assert (record is None) == (step == 0)  # no preconditioner before Adam's first step
            assert all(torch.equal(a, b) for a, b in zip(snapshot, list(model.parameters()) + list(model.buffers())))
            assert all(p.grad is g for p, g in zip(model.parameters(), grads)) and model.training
            after = optimizer.state_dict()["state"]
            assert after.keys() == state.keys()
            for key in state:
                for name, value in state[key].items():
                    assert torch.equal(after[key][name], value)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        random.random(), np.random.rand()
    return model, optimizer, (torch.get_rng_state(), random.getstate(), np.random.get_state())


def test_training_run_is_bitwise_the_same_with_tracking():
    model_a, opt_a, rng_a = train(track=True)
    model_b, opt_b, rng_b = train(track=False)
    for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert all(torch.equal(p[name], q[name]) for name in p)
    assert torch.equal(rng_a[0], rng_b[0])
    assert rng_a[1] == rng_b[1]
    assert all(np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v for u, v in zip(rng_a[2], rng_b[2]))


def test_preconditioned_sharpness_matches_dense(problem):
    model, loader, x, y = problem
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = SharpnessTracker(model, loader, F.cross_entropy, num_eigenthings=2, preconditioner=optimizer, tol=TOL)
    assert tracker.step(0) is None
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    record = tracker.step(3)
    scale = torch.diag(adam_preconditioner(optimizer).rsqrt())
    exact = np.linalg.eigvalsh((scale @ dense_loss_hessian(model, F.cross_entropy, x, y) @ scale).numpy())[::-1][:2]
    np.testing.assert_allclose(record.eigenvalues, exact, rtol=TOL)
    assert record.preconditioned
    # the raw Hessian's top eigenvalue is a different number
    raw = np.linalg.eigvalsh(dense_loss_hessian(model, F.cross_entropy, x, y).numpy())[-1]
    assert abs(raw - exact[0]) > 0.1 * exact[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_log_file_round_trip(problem, tmp_path, suffix):
    model, loader, x, y = problem
    path = tmp_path / f"run{suffix}"
    tracker = SharpnessTracker(model, loader, F.cross_entropy, every=1, num_eigenthings=2, log_path=path,
                               extras=lambda ctx: {"step_squared": ctx.step**2, "label": None})
    for step in range(3):
        tracker.step(step)
        gd_step(model, x, y)
    back = read_log(path)
    assert [r.as_dict() for r in back] == [r.as_dict() for r in tracker.records]
    assert back[2].extras == {"loss": tracker.records[2].extras["loss"],
                              "grad_norm": tracker.records[2].extras["grad_norm"], "step_squared": 4, "label": None}
    assert path.with_name(path.name + ".vectors.pt").exists()
    if suffix == ".csv":
        header = path.read_text().splitlines()[0].split(",")
        assert header[:8] == ["step", "which", "products", "seconds", "warm", "preconditioned", "eigenvalue_0",
                              "eigenvalue_1"]


def test_a_crash_loses_only_the_step_being_measured(problem, tmp_path):
    model, loader, x, y = problem
    path = tmp_path / "run.jsonl"

    def ctrl_c_at_step_4(ctx):
        if ctx.step == 4:
            raise KeyboardInterrupt
        return {}

    # the with block releases the log file on the way out, as the end of a crashed process would
    with pytest.raises(KeyboardInterrupt):
        with SharpnessTracker(model, loader, F.cross_entropy, every=2, log_path=path,
                              extras=ctrl_c_at_step_4) as tracker:
            for step in range(7):
                tracker.step(step)
                gd_step(model, x, y)
    assert tracker.closed and [r.step for r in read_log(path)] == [0, 2]
    # a write cut short by a crash leaves a partial line: a resume drops it from the file
    with open(path, "a") as handle:
        handle.write('{"step": 4, "which": "LA", "eigenval')
    with pytest.warns(UserWarning, match="line 3: cut short"):
        assert [r.step for r in read_log(path)] == [0, 2]
    with pytest.warns(UserWarning, match="line 3: cut short.*removed from the file"):
        resumed = SharpnessTracker(model, loader, F.cross_entropy, every=2, log_path=path, if_exists="resume")
    assert resumed.last_step == 2 and path.read_text().endswith("\n")
    assert resumed.step(4).warm


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_continues_the_file_with_the_warm_start(problem, tmp_path, suffix):
    model, loader, x, y = problem
    path = tmp_path / f"run{suffix}"
    first = SharpnessTracker(model, loader, F.cross_entropy, every=2, num_eigenthings=2, log_path=path)
    for step in range(5):
        first.step(step)
        gd_step(model, x, y, lr=0.05)
    with pytest.raises(FileExistsError, match="if_exists='resume'"):
        SharpnessTracker(model, loader, F.cross_entropy, log_path=path)
    first.close()
    with pytest.raises(ValueError, match="Cannot resume"):
        SharpnessTracker(model, loader, F.cross_entropy, num_eigenthings=3, log_path=path, if_exists="resume")

    second = SharpnessTracker(model, loader, F.cross_entropy, every=2, num_eigenthings=2, log_path=path,
                              if_exists="resume")
    assert [r.step for r in second.records] == [0, 2, 4]
    assert second.step(4) is None and second.step(3, force=True) is None  # already measured
    record = second.step(6)
    assert record.warm and record.products < first.records[0].products
    assert [r.step for r in read_log(path)] == [0, 2, 4, 6]
    second.close()

    fresh = SharpnessTracker(model, loader, F.cross_entropy, every=2, num_eigenthings=2, log_path=path,
                             if_exists="overwrite")
    assert fresh.records == [] and not fresh.step(6).warm
    assert [r.step for r in read_log(path)] == [6]


def test_attach_tracks_after_optimizer_steps(problem):
    model, loader, x, y = problem
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(model, loader, F.cross_entropy, every=2, builtin_extras=())
    handle = tracker.attach(optimizer, start_step=10)
    for update in range(1, 6):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if update == 2:  # the hook measured the parameters after this second update
            exact = exact_top(dense_loss_hessian(model, F.cross_entropy, x, y), 1, "LA")[0]
            assert tracker.records[0].eigenvalues[0] == pytest.approx(exact[0], rel=TOL)
    handle.remove()
    optimizer.step()
    assert [r.step for r in tracker.records] == [12, 14]
    assert tracker(16).step == 16  # the tracker itself is the callback


def test_extras_hook_sees_the_hessian_and_is_validated(problem):
    model, loader, x, y = problem
    v = torch.randn(196, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def curvature_along_v(ctx):
        return {"vHv": float(v @ ctx.hessian.apply(v)), "top": ctx.eigenvalues[0]}

    tracker = SharpnessTracker(model, loader, F.cross_entropy, extras=[curvature_along_v])
    record = tracker.step(0)
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    assert record.extras["vHv"] == pytest.approx(float(v @ hessian @ v), rel=1e-10)
    assert record.extras["top"] == record.eigenvalues[0]

    for hook, error, words in [
        (lambda ctx: {"loss": 1.0}, ValueError, "already has"),
        (lambda ctx: {"bad": "text"}, TypeError, "numbers"),
        (lambda ctx: 3.0, TypeError, "dict"),
    ]:
        with pytest.raises(error, match=words):
            SharpnessTracker(model, loader, F.cross_entropy, extras=hook).step(0)


def test_a_csv_log_refuses_list_extras(problem, tmp_path):
    model, loader, _, _ = problem
    tracker = SharpnessTracker(model, loader, F.cross_entropy, log_path=tmp_path / "a.csv",
                               extras=lambda ctx: {"pair": [1.0, 2.0]})
    with pytest.raises(ValueError, match="jsonl"):
        tracker.step(0)


def test_other_solvers_mode_and_callable(problem):
    model, loader, x, y = problem
    exact, _ = exact_top(dense_loss_hessian(model, F.cross_entropy, x, y), 2, "LA")
    calls = []

    def my_solver(operator, num_eigenthings, which, init_vecs=None, **kwargs):
        calls.append(init_vecs is not None)
        vals, vecs = deflated_power_iteration(operator, num_eigenthings, power_iter_steps=3000, which=which,
                                              init_vecs=init_vecs, power_iter_err_threshold=1e-6, verbose=False)
        return torch.as_tensor(vals), torch.as_tensor(vecs)  # a bare pair: the tracker measures residuals

    for solver in ("power_iter", my_solver):
        tracker = SharpnessTracker(model, loader, F.cross_entropy, num_eigenthings=2, solver=solver, tol=1e-5)
        for step in range(2):
            record = tracker.step(step)
            np.testing.assert_allclose(record.eigenvalues, exact, rtol=1e-5)
            assert record.warm == (step == 1) and all(record.converged)
    assert calls == [False, True]


def test_bad_arguments_are_refused_clearly(problem, tmp_path):
    model, loader, _, _ = problem
    make = lambda **kw: SharpnessTracker(model, loader, F.cross_entropy, **kw)  # noqa: E731
    cases = [
        (dict(every=0), ValueError, "every must be a positive integer"),
        (dict(which="XX"), ValueError, "which="),
        (dict(num_eigenthings=196), ValueError, "smaller than the operator size"),
        (dict(solver="nope"), ValueError, "not a known mode"),
        (dict(solver=3), TypeError, "mode name"),
        (dict(solver_kwargs={"init_vecs": None}), ValueError, "may not set"),
        (dict(solver_kwargs={"bogus": 1}), TypeError, "does not accept bogus"),
        (dict(builtin_extras=("loss", "accuracy")), ValueError, "unknown 'accuracy'"),
        (dict(extras=[3]), TypeError, "hook"),
        (dict(log_path=tmp_path / "log.txt"), ValueError, ".jsonl"),
        (dict(log_path=tmp_path / "missing" / "log.jsonl"), FileNotFoundError, "does not exist"),
        (dict(log_path=tmp_path / "a.jsonl", if_exists="append"), ValueError, "if_exists"),
        (dict(preconditioner=torch.optim.SGD(model.parameters(), lr=0.1)), TypeError, "Adam"),
        (dict(preconditioner=torch.optim.Adam(nn.Linear(2, 2).parameters())), ValueError, "does not optimise"),
        (dict(tol=0), ValueError, "tol must be positive"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=None) as info:
            make(**kwargs)
        assert words in str(info.value), (kwargs, str(info.value))
    tracker = make()
    with pytest.raises(ValueError, match=">= 0"):
        tracker.step(-1)
    with pytest.raises(TypeError, match="int"):
        tracker.step(1.0)


def test_jsonl_lines_are_plain_json(problem, tmp_path):
    model, loader, _, _ = problem
    path = tmp_path / "a.jsonl"
    SharpnessTracker(model, loader, F.cross_entropy, log_path=path).step(0)
    data = json.loads(path.read_text().splitlines()[0])
    assert set(data) >= {"step", "eigenvalues", "residuals", "converged", "products", "seconds", "loss", "grad_norm"}
    assert math.isfinite(data["seconds"]) and data["seconds"] > 0


def test_log_without_vectors_resumes_cold(problem, tmp_path):
    model, loader, _, _ = problem
    path = tmp_path / "a.jsonl"
    SharpnessTracker(model, loader, F.cross_entropy, log_path=path, save_vectors=False).step(0)
    assert not path.with_name("a.jsonl.vectors.pt").exists()
    with SharpnessTracker(model, loader, F.cross_entropy, log_path=path, if_exists="resume") as tracker:
        assert not tracker.step(1).warm
    with TrackingLog(path, if_exists="resume") as log:
        assert log.read_vectors(196)[0] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tracking_matches_cpu_and_keeps_the_cuda_rng(problem, tmp_path):
    model, loader, x, y = problem
    cpu = SharpnessTracker(model, loader, F.cross_entropy, num_eigenthings=2, use_gpu=False).step(0)
    gpu_model = small_mlp(width=8).cuda()
    gpu_loader = [(a.cuda(), b.cuda()) for a, b in loader]
    tracker = SharpnessTracker(gpu_model, gpu_loader, F.cross_entropy, num_eigenthings=2,
                               log_path=tmp_path / "gpu.jsonl", extras=lambda ctx: {"r": float(torch.rand((), device="cuda"))})
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    record = tracker.step(0)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert tracker.eigenvectors.device.type == "cuda"
    np.testing.assert_allclose(record.eigenvalues, cpu.eigenvalues, rtol=1e-8)
    assert record.extras["loss"] == pytest.approx(cpu.extras["loss"], rel=1e-12)
    # a CPU model tracked on a GPU copy (use_gpu=True) stays on the CPU
    cpu_model = small_mlp(width=8)
    on_copy = SharpnessTracker(cpu_model, loader, F.cross_entropy, num_eigenthings=2, use_gpu=True)
    assert on_copy.hessian.device.type == "cuda"
    np.testing.assert_allclose(on_copy.step(0).eigenvalues, cpu.eigenvalues, rtol=1e-8)
    assert all(p.device.type == "cpu" for p in cpu_model.parameters())


class _WrappedLikeDDP(nn.parallel.DistributedDataParallel):
    """A DistributedDataParallel in type only (no process group needed): names get the ``module.`` prefix."""

    def __init__(self, module):
        nn.Module.__init__(self)
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_preconditioned_sharpness_of_a_ddp_wrapped_model(problem):
    """The operator unwraps DDP (names without ``module.``); the optimizer state must still be found."""
    model, loader, x, y = problem
    wrapped = _WrappedLikeDDP(model)
    assert next(iter(dict(wrapped.named_parameters()))).startswith("module.")
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    tracker = SharpnessTracker(wrapped, loader, F.cross_entropy, preconditioner=optimizer, tol=TOL,
                               builtin_extras=())
    assert tracker.step(0) is None
    optimizer.zero_grad()
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    record = tracker.step(1)
    scale = torch.diag(adam_preconditioner(optimizer).rsqrt())
    exact = np.linalg.eigvalsh((scale @ dense_loss_hessian(model, F.cross_entropy, x, y) @ scale).numpy())[-1]
    assert record.eigenvalues[0] == pytest.approx(exact, rel=TOL)
    with pytest.raises(ValueError, match="does not optimise"):
        SharpnessTracker(wrapped, loader, F.cross_entropy, preconditioner=torch.optim.Adam(nn.Linear(2, 2).parameters()))


def test_builtin_trace_extra_matches_the_dense_trace(problem, tmp_path):
    model, loader, x, y = problem
    path = tmp_path / "trace.csv"
    tracker = SharpnessTracker(model, loader, F.cross_entropy, builtin_extras=("trace", "loss"), trace_products=90,
                               log_path=path)
    for step in range(2):
        record = tracker.step(step)
        exact = float(dense_loss_hessian(model, F.cross_entropy, x, y).trace())
        assert set(record.extras) == {"loss", "trace", "trace_std_error"}
        assert 0 < record.extras["trace_std_error"] < 0.2 * abs(exact)
        assert abs(record.extras["trace"] - exact) < 4 * record.extras["trace_std_error"]
        gd_step(model, x, y)
    assert [r.extras["trace"] for r in read_log(path)] == [r.extras["trace"] for r in tracker.records]
    # it is the trace of H, not of the preconditioned operator, and the run's RNG is untouched
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    state = torch.get_rng_state()
    record = SharpnessTracker(model, loader, F.cross_entropy, builtin_extras=("trace",), trace_products=90,
                              preconditioner=optimizer).step(0)
    assert torch.equal(torch.get_rng_state(), state)
    exact = float(dense_loss_hessian(model, F.cross_entropy, x, y).trace())
    assert abs(record.extras["trace"] - exact) < 4 * record.extras["trace_std_error"]
    with pytest.raises(ValueError, match="trace_products"):
        SharpnessTracker(model, loader, F.cross_entropy, builtin_extras=("trace",), trace_products=0)
