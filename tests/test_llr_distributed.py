"""llr.py's synchronised batch norm across processes (nn.SyncBatchNorm, 2 CPU processes, gloo)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import llr
import methods
from conftest import spawn_gloo


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def _setting(rank):
    """The batch (x, y) of 8, this process's half of it, and the same model twice: with
    SyncBatchNorm (this process's half) and with BatchNorm (the whole batch)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return g, x, y, slice(4 * rank, 4 * rank + 4), nn.SyncBatchNorm.convert_sync_batchnorm(_net()), _net()


def _worker(rank, world):
    g, x, y, mine, synced, whole = _setting(rank)
    delta = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.1
    # losses on x and x + δ normalised with the statistics of the whole clean batch
    with llr.reuse_clean_batch_statistics(synced, update_running_stats=True):
        loss = (nn.functional.cross_entropy(synced(x[mine]), y[mine], reduction="sum")
                + nn.functional.cross_entropy(synced(x[mine] + delta[mine]), y[mine], reduction="sum"))
    loss.backward()
    with llr.reuse_clean_batch_statistics(whole, update_running_stats=True):
        reference = (nn.functional.cross_entropy(whole(x), y, reduction="sum")
                     + nn.functional.cross_entropy(whole(x + delta), y, reduction="sum"))
    reference.backward()
    for p, q in zip(synced.parameters(), whole.parameters()):
        summed = p.grad.clone()
        dist.all_reduce(summed)  # the gradient of the total loss, through the all-reduce
        torch.testing.assert_close(summed, q.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(synced[1].running_mean, whole[1].running_mean)
    torch.testing.assert_close(synced[1].running_var, whole[1].running_var)
    # the double backward runs through the synchronised statistics
    synced.zero_grad()
    loss, _ = llr.llr_loss(synced, x[mine], y[mine], 0.1, steps=2, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in synced.parameters())


def test_sync_batchnorm_statistics_are_global_and_differentiable():
    """Two processes with half a batch each get exactly the gradients and running statistics
    of one process with the whole batch (float64)."""
    spawn_gloo(_worker)


def _lfr_worker(rank, world):
    _, x, y, mine, synced, whole = _setting(rank)
    start = torch.Generator().manual_seed(2)
    if rank == 1:  # this process's random starts are those the whole batch draws for its half
        torch.rand(4, 3, 5, 5, generator=start, dtype=torch.float64)
    loss, _ = methods.lfr_loss(synced, x[mine], y[mine], 0.1, steps=1, generator=start)
    loss.backward()
    reference, _ = methods.lfr_loss(whole, x, y, 0.1, steps=1, generator=torch.Generator().manual_seed(2))
    reference.backward()
    for p, q in zip(synced.parameters(), whole.parameters()):
        mean = p.grad.clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(mean / world, q.grad, rtol=1e-8, atol=1e-10)


def test_lfr_under_sync_batchnorm_equals_the_whole_batch():
    """LFR's last pass (normalised with the clean batch's statistics) under 2-process SyncBatchNorm:
    the processes' mean gradient is the whole batch's (float64)."""
    spawn_gloo(_lfr_worker)


def _failing_worker(rank, world):
    assert rank < 0, f"rank {rank} fails"  # every process fails before the barrier


def test_a_failing_process_fails_the_test():
    """spawn_gloo's clean exit (os._exit(0) after the barrier) does not hide a failure."""
    import pytest
    from torch.multiprocessing import ProcessRaisedException

    with pytest.raises(ProcessRaisedException, match=r"rank \d fails"):
        spawn_gloo(_failing_worker)


def _first_order_worker(rank, world, compiled):
    _, x, y, mine, synced, whole = _setting(rank)
    start = torch.Generator().manual_seed(2)
    if rank == 1:  # this process's random starts are those the whole batch draws for its half
        torch.rand(4, 3, 5, 5, generator=start, dtype=torch.float64)
    if compiled:
        loss, info = llr.CompiledLLR(synced, steps=2, first_order=True, backend="aot_eager")(x[mine], y[mine], 0.1,
                                                                                              generator=start)
    else:
        loss, info = llr.llr_loss(synced, x[mine], y[mine], 0.1, steps=2, first_order=True, generator=start)
    loss.backward()
    reference, whole_info = llr.llr_loss(whole, x, y, 0.1, steps=2, first_order=True,
                                         generator=torch.Generator().manual_seed(2))
    reference.backward()
    torch.testing.assert_close(info["gamma"], whole_info["gamma"][mine], rtol=1e-8, atol=1e-12)
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, reference.detach(), rtol=1e-10, atol=1e-12)
    for p, q in zip(synced.parameters(), whole.parameters()):
        mean = p.grad.clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(mean / world, q.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(synced[1].running_mean, whole[1].running_mean)
    torch.testing.assert_close(synced[1].running_var, whole[1].running_var)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_first_order_under_sync_batchnorm_equals_the_whole_batch(compiled):
    """First-order LLR (its statistics those of the whole clean batch, all-reduced differentiably by
    SyncBatchNorm's groups inside the one batched pass) on half a batch in each of 2 processes: the processes'
    mean loss and gradient, γ and running statistics are the whole batch's in one process (float64), eager and
    compiled (torch.func and torch.compile's tracing, aot_eager: the functional all-reduces in the graph)."""
    spawn_gloo(_first_order_worker, compiled)


def _ddp_worker(rank, world, compiled):
    """Under DistributedDataParallel (plain batch norm, each process its own statistics, as on CPUs), first-order
    LLR's weight gradient is the mean over processes of each process's own gradient: DDP's hooks (eager, through
    its forward) or CompiledLLR's average (compiled, past its forward)."""
    _, x, y, mine, _, _ = _setting(rank)
    alone, ddp = _net(), nn.parallel.DistributedDataParallel(_net())
    start = lambda: torch.Generator().manual_seed(3 + rank)  # noqa: E731
    loss_fn = (llr.CompiledLLR(ddp, steps=1, first_order=True, backend="aot_eager") if compiled else
               lambda *a, generator: llr.llr_loss(ddp, *a, steps=1, first_order=True, generator=generator))
    for _ in range(2):  # a second step: the average is queued afresh at every backward
        ddp.zero_grad()
        alone.zero_grad()
        loss_fn(x[mine], y[mine], 0.1, generator=start())[0].backward()
        llr.llr_loss(alone, x[mine], y[mine], 0.1, steps=1, first_order=True, generator=start())[0].backward()
        for p, q in zip(ddp.parameters(), alone.parameters()):
            mean = q.grad.clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(p.grad, mean / world, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_first_order_gradients_are_averaged_under_ddp(compiled):
    spawn_gloo(_ddp_worker, compiled)


def test_compiled_exact_llr_refuses_ddp():
    """What remains untested is refused in one line: the exact form compiled across processes."""
    spawn_gloo(_refusing_worker)


def _refusing_worker(rank, world):
    with pytest.raises(ValueError, match="first_order=True"):
        llr.CompiledLLR(nn.parallel.DistributedDataParallel(_net()), steps=1)
