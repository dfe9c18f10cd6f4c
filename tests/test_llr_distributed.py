"""llr.py's synchronised batch norm across processes (nn.SyncBatchNorm, 2 CPU processes, gloo)."""
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
