"""Local Linearity Regularisation (LLR) in PyTorch: one file, torch only. Copy it.

Qin et al., "Adversarial Robustness through Local Linearization", NeurIPS 2019
(arXiv:1907.02610). For a classifier with per-sample cross-entropy loss ℓ(x):

    Eq. (5)  linearity gap       g(δ; x) = |ℓ(x + δ) − ℓ(x) − δᵀ∇ₓℓ(x)|
    Eq. (6)  local linearity     γ(ε, x) = max_{δ ∈ B(ε)} g(δ; x)
    Eq. (7)  the bound it gives  ℓ(x + δ) ≤ ℓ(x) + |δᵀ∇ₓℓ(x)| + γ(ε, x)  for all δ ∈ B(ε)
    Eq. (8)  LLR objective       ℓ(x) + λ·γ(ε, x) + μ·|δ_LLRᵀ∇ₓℓ(x)|,  δ_LLR = argmax of Eq. (6)

B(ε) is the ℓ∞ ball of radius ε (the paper's; `norm="l2"` gives the ℓ2 ball); here x + δ
is also kept in the image box [0, 1].
Minimising Eq. (8) makes the loss locally linear, so the first-order term, which
it also penalises, bounds the worst case (Eq. 7): robustness without gradient
obfuscation, at the cost of a few ascent steps instead of a full adversarial attack.

Usage (model maps images in [0, 1] to logits; smooth activations, e.g. softplus):

    loss, info = llr_loss(model, x, y, eps=8 / 255)   # the authors' λ = 2, μ = 0.6, 10 steps
    loss.backward()                                    # includes the double backward
    optimizer.step()

Conventions, so that results match the authors' TensorFlow code
(github.com/google-deepmind/local_linearity_regularizer, `regularizers.py`):
- δ_LLR is found by Adam on δ in pixel units (lr 0.1, β = (0.9, 0.999)) from a
  uniform random start in B(ε), projected onto B(ε) ∩ [0, 1] after every step;
  the search maximises g alone and no gradient flows through it.
- ∇ₓℓ(x) is the input gradient of the batch's summed loss, kept in the graph
  (`create_graph=True`), so the weight gradient of γ and of |δᵀ∇ₓℓ(x)| includes
  second derivatives ("double backprop"). ReLU networks have zero curvature
  almost everywhere: use softplus.
- Batch norm in train mode: every pass on x + δ is normalised with the batch
  statistics of the clean x (differentiably, as the authors' `set_stats`), and only
  the clean pass of `llr_loss` updates the running statistics. See
  `reuse_clean_batch_statistics`.

Compiled (`CompiledLLR`): the same loss and weight gradients from code that torch.compile fuses,
faster where kernel launches and memory traffic bound the eager double backward (GPUs):

    llr = CompiledLLR(model, steps=2)                  # after model.to(device)
    loss, info = llr(x, y, eps=8 / 255)                # as llr_loss(model, x, y, eps, steps=2)
"""
import contextlib
import functools
import warnings
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["linearity_gap", "local_linearity", "llr_loss", "CompiledLLR", "reuse_clean_batch_statistics",
           "CleanBatchStatistics"]


# --------------------------------------------------------------------------- batch norm
@contextlib.contextmanager
def reuse_clean_batch_statistics(model, update_running_stats=False):
    """Inside this context, every batch-norm layer of `model` that is in train mode
    normalises *all* its forward passes with the batch statistics of its *first*
    pass (the clean x): the passes on x + δ then see exactly the normalisation of
    the clean pass, and the loss of each perturbed sample depends on its own input
    only, as in the authors' code (`get_stats`/`set_stats` in their `batchnorm.py`).

    The statistics (mean and biased variance, in float32) are ordinary tensors in
    the autograd graph, so gradients flow through them to any order, which the
    native kernels do not offer for `nn.SyncBatchNorm`. For a `SyncBatchNorm` in a
    multi-process run they are reduced over its process group, as it would do.
    Running statistics are updated once, from the first pass, when
    `update_running_stats` is true; never otherwise. Layers in eval mode use their
    running statistics as usual and are left alone.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for layer in layers:
        layer.forward = functools.partial(_normalise_with_first_batch, layer, {}, update_running_stats)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def _normalise_with_first_batch(layer, saved, update_running_stats, x):
    if "mean" not in saved:  # the first (clean) pass: measure and keep the statistics
        saved["mean"], saved["var"], count = _batch_moments(layer, x)
        if update_running_stats and layer.track_running_stats:
            _update_running_stats(layer, saved["mean"].detach(), saved["var"].detach(), count)
    return _normalise(layer, x, saved["mean"], saved["var"])


def _normalise(layer, x, mean, var):
    """Batch norm of x [N, C, *] with the given per-channel mean and biased variance (float32)."""
    scale = torch.rsqrt(var + layer.eps)  # [C], float32
    if layer.affine:
        scale = scale * layer.weight
        shift = layer.bias - mean * scale
    else:
        shift = -mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast [C] over [N, C, *]
    return (_float32_or_wider(x) * scale.view(shape) + shift.view(shape)).to(x.dtype)  # in float32, cast once


def _batch_moments(layer, x):
    """Per-channel mean and biased variance of x [N, C, *], in float32, and their count."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(_float32_or_wider(x), dim=dims, correction=0)
    count = x.numel() // x.shape[1]
    group = _sync_group(layer)
    if group is None:
        return mean, var, count
    # Combine the processes' moments exactly (Chan et al.), as nn.SyncBatchNorm does,
    # with an all-reduce whose backward is again an all-reduce: differentiable to any order.
    from torch.distributed._functional_collectives import all_reduce
    n = mean.new_full((1,), count)
    total = all_reduce(torch.cat([mean * n, n]), "sum", group)
    count = total[-1]
    global_mean = total[:-1] / count
    global_var = all_reduce(n * (var + (mean - global_mean) ** 2), "sum", group) / count
    return global_mean, global_var, count


def _sync_group(layer):
    """The process group a SyncBatchNorm layer reduces over in a multi-process run, else None."""
    if not (isinstance(layer, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return None
    group = layer.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


@torch.no_grad()
def _update_running_stats(layer, mean, var, count):
    """The update nn.BatchNorm does in train mode (unbiased variance, momentum or cumulative)."""
    if count < 2:
        raise ValueError(f"batch norm needs more than 1 value per channel in train mode, got {count}")
    layer.num_batches_tracked += 1
    momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
    unbiased_var = var * count / (count - 1)
    layer.running_mean.lerp_(mean.to(layer.running_mean.dtype), momentum)
    layer.running_var.lerp_(unbiased_var.to(layer.running_var.dtype), momentum)


# --------------------------------------------------------------------------- the measure
def _float32_or_wider(t):
    """t in float32 at least: bf16/fp16 from autocast is promoted, float64 kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _per_sample_loss(model, x, y):
    """ℓ(x): per-sample cross-entropy [B], in float32 at least, even under autocast."""
    return F.cross_entropy(_float32_or_wider(model(x)), y, reduction="none")


def _loss_and_input_grad(model, x, y, create_graph):
    """Clean logits, ℓ(x) [B] and ∇ₓℓ(x) [B, ...] (computed even under no_grad); with
    `create_graph` the gradient stays differentiable with respect to the weights
    (double backprop)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(_float32_or_wider(logits), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    return logits, loss, grad


def _directional(delta, grad):
    """δᵀ∇ₓℓ(x) per sample: [B], in float32 at least."""
    return (_float32_or_wider(delta) * _float32_or_wider(grad)).flatten(1).sum(1)


def _gap(model, x, y, x_adv, clean_loss, grad):
    """Eq. (5) at δ = x_adv − x, given ℓ(x) and ∇ₓℓ(x): g per sample, [B]."""
    return (_per_sample_loss(model, x_adv, y) - clean_loss - _directional(x_adv - x, grad)).abs()


def _project(x_adv, x, eps, norm="linf"):
    """A point of B(ε) ∩ [0, 1] for x_adv. ℓ∞: clip to the ball around x, then to the box (the
    nearest point). ℓ2: scale x_adv − x into the ball, then clip to the box (as ℓ2 PGD does; the
    result stays in the ball, since x is in the box)."""
    if norm == "linf":
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    delta = x_adv - x
    scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
    return (x + delta * scale.view(-1, *[1] * (x.dim() - 1))).clamp(0, 1)


def _random_start(x, eps, generator=None, norm="linf"):
    """x + δ with δ uniform in B(ε) (ℓ2: a Gaussian direction, radius ε·U^(1/d)), projected into
    [0, 1], as the authors' `pgd_attack` starts."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return _project(x + (2 * noise - 1) * eps, x, eps)
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = eps * torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype) ** (1 / x[0].numel())
    scale = radius / direction.flatten(1).norm(dim=1).clamp_min(1e-12)
    return _project(x + direction * scale.view(-1, *[1] * (x.dim() - 1)), x, eps, norm)


def linearity_gap(model, x, y, delta):
    """Eq. (5): g(δ; x) = |ℓ(x + δ) − ℓ(x) − δᵀ∇ₓℓ(x)| for each sample, shape [B].

    x: images [B, ...] in [0, 1]; y: labels [B]; delta: perturbations shaped like x.
    Differentiable with respect to the weights when grad mode is on. Batch-norm
    layers in train mode normalise x + δ with the statistics of x and do not update
    their running statistics (see `reuse_clean_batch_statistics`).
    """
    _check_images(x)
    with reuse_clean_batch_statistics(model):
        _, clean_loss, grad = _loss_and_input_grad(model, x, y, create_graph=torch.is_grad_enabled())
        return _gap(model, x, y, x + delta, clean_loss, grad)


class _Search:
    """The ascent on g(δ; x) over B(ε) ∩ [0, 1], from a uniform random start, projected after every
    step; no gradient flows to the weights. ℓ∞: Adam on x + δ in pixel units (lr 0.1, β = (0.9,
    0.999), eps 1e-9), the authors' `UnrolledAdam`. ℓ2: normalised-gradient steps of 2.5·ε/steps,
    as ℓ2 PGD (our choice: Adam's per-coordinate steps are ℓ∞-shaped, and would spend the ℓ2
    budget on a sign pattern)."""

    def __init__(self, x, eps, steps, lr, generator, norm):
        self.x, self.eps, self.norm = x, eps, norm
        self.x_adv = _random_start(x, eps, generator, norm).requires_grad_(True)
        if norm == "linf":
            self.optimizer = torch.optim.Adam([self.x_adv], lr=lr, eps=1e-9, maximize=True)
        self.step_size = 2.5 * eps / max(steps, 1)

    def step(self, gap):
        """One step up the gap [B] (samples are independent: the gradient of the sum), then the projection."""
        (grad,) = torch.autograd.grad(gap.sum(), self.x_adv)
        with torch.no_grad():
            if self.norm == "linf":
                self.x_adv.grad = grad
                self.optimizer.step()
            else:
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
                self.x_adv += self.step_size * grad / norm
            self.x_adv.copy_(_project(self.x_adv, self.x, self.eps, self.norm))


def _search_delta(model, x, y, eps, steps, lr, clean_loss, grad, generator, norm="linf"):
    """δ_LLR of Eq. (8) for training: `steps` ascent steps on g(δ; x), the last iterate x + δ
    (detached; no gradient flows through the search)."""
    clean_loss, grad = clean_loss.detach(), grad.detach()
    search = _Search(x, eps, steps, lr, generator, norm)
    with torch.enable_grad():  # the search differentiates g in x + δ, even when the caller measures under no_grad
        for _ in range(steps):
            search.step(_gap(model, x, y, search.x_adv, clean_loss, grad))
    return search.x_adv.detach()


def local_linearity(model, x, y, eps, steps=50, lr=0.1, generator=None, norm="linf"):
    """Eq. (6): γ(ε, x) = max_{δ ∈ B(ε), x + δ ∈ [0, 1]} g(δ; x), per sample, shape [B].

    The measurement of the paper's Fig. 2 and F3: `steps` steps of the search (ℓ∞: Adam, lr 0.1
    in pixel units; ℓ2: see `_Search`) from a uniform random start, projected after each step, keeping
    the best iterate of each sample, so the result is a lower bound on γ that never
    decreases with more steps (same model, same `generator` state). Returns
    (gamma [B], delta [B, ...]), detached. Running batch-norm statistics are left
    untouched; in train mode the clean batch's statistics normalise every pass.
    """
    _check(eps, norm, x)
    with reuse_clean_batch_statistics(model), torch.enable_grad():
        _, clean_loss, grad = _loss_and_input_grad(model, x, y, create_graph=False)
        clean_loss, grad = clean_loss.detach(), grad.detach()
        search = _Search(x, eps, steps, lr, generator, norm)
        best_gap, best_x = torch.full_like(clean_loss, -1.0), search.x_adv.detach().clone()
        for step in range(steps + 1):  # g at the start and after each step; the last needs no gradient
            with torch.set_grad_enabled(step < steps):
                gap = _gap(model, x, y, search.x_adv, clean_loss, grad)
            improved = gap.detach() > best_gap
            best_gap = torch.where(improved, gap.detach(), best_gap)
            best_x[improved] = search.x_adv.detach()[improved]
            if step < steps:
                search.step(gap)
    return best_gap, best_x - x


# --------------------------------------------------------------------------- the objective
def llr_loss(model, x, y, eps, lam=2.0, mu=0.6, steps=10, lr=0.1, generator=None, norm="linf"):
    """Eq. (8): mean over the batch of ℓ(x) + λ·g(δ_LLR; x) + μ·|δ_LLRᵀ∇ₓℓ(x)|.

    model: maps images [B, ...] in [0, 1] to logits [B, K]. x: [B, ...] in [0, 1].
    y: [B] integer labels. eps: radius of the ball in pixel units (8/255 for CIFAR-10 in ℓ∞).
    norm: "linf" (the paper's) or "l2" (the ball of the search; see `_Search`).
    lam, mu: λ and μ of Eq. (8). steps, lr: the search's steps on δ, and Adam's learning rate
    (ℓ∞; the ℓ2 search takes steps of 2.5·ε/steps).
    The defaults are the authors' released CIFAR-10 config (`config.py`: 10 steps; their loss
    2·CE + 4·(γ + 0.3·|δᵀ∇ₓℓ|) is twice this one with λ = 2, μ = 0.6; train it with SGD at lr 0.2
    and weight decay 1e-4 to match their lr 0.1 and ℓ2 weight 2e-4 on that doubled loss). The paper
    uses 2 steps on ImageNet at ε = 4/255. generator: optional torch.Generator for the random
    start (the global RNG otherwise).

    δ_LLR comes from `steps` ascent steps on g with no gradient through the search;
    γ is then g(δ_LLR; x), a lower bound on Eq. (6). The returned loss is
    differentiable with respect to the weights through ℓ(x), ℓ(x + δ_LLR) and
    ∇ₓℓ(x) (double backprop). Costs: one clean forward and input backward with
    graph, `steps` forward + input-backward passes, one forward on x + δ_LLR.

    Under torch.no_grad() the loss is measured, not differentiable (the search still differentiates
    g in x + δ). Images outside [0, 1], or a string ε, raise ValueError; a model with ReLU warns once.

    Returns (loss, info); info holds detached per-sample tensors: `delta` [B, ...],
    `gamma`, `grad_term` (|δ_LLRᵀ∇ₓℓ(x)|), `clean_loss` ([B] each) and the clean
    `logits` [B, K] (for accuracy, with no extra forward pass).
    """
    _check(eps, norm, x)
    _warn_if_relu(model)
    with reuse_clean_batch_statistics(model, update_running_stats=True):
        logits, clean_loss, grad = _loss_and_input_grad(model, x, y, create_graph=torch.is_grad_enabled())
        x_adv = _search_delta(model, x, y, eps, steps, lr, clean_loss, grad, generator, norm)
        gamma = _gap(model, x, y, x_adv, clean_loss, grad)
    delta = x_adv - x
    grad_term = _directional(delta, grad).abs()
    loss = (clean_loss + lam * gamma + mu * grad_term).mean()
    info = {"delta": delta, "gamma": gamma.detach(), "grad_term": grad_term.detach(),
            "clean_loss": clean_loss.detach(), "logits": logits.detach()}
    return loss, info


# --------------------------------------------------------------------------- compiled
class CleanBatchStatistics:
    """`reuse_clean_batch_statistics` for compiled code, where a layer's forward cannot be patched
    and restored inside the graph and running statistics cannot be updated inside `torch.func.grad`.

        clean = CleanBatchStatistics(model)
        with clean.installed() as layers:                  # outside the compiled function
            logits, statistics = compiled_clean_pass(x)    # calls clean.record(), model(x), clean.recorded()
            clean.update_running_stats(layers, statistics) # eagerly, once, from the clean pass
            compiled_pass_on_x_adv(x_adv, statistics)      # calls clean.reuse(statistics), model(x_adv)

    While installed, every batch-norm layer in train mode normalises with the statistics of the
    clean pass: measured (mean, biased variance, float32, differentiable) in the pass between
    `record()` and `recorded()`, which returns them as a list, one (mean, var) per layer in call
    order, to be returned from the compiled function as ordinary tensors; given back to the same
    layers in the same order by `reuse(statistics)` for every later pass. The layers' forwards
    are the same objects at every call, so compiled code sees no change and does not recompile."""

    def __init__(self, model):
        self.model, self._forwards = model, {}
        self._recording, self._counts, self._given, self._next = None, [], [], 0

    @contextlib.contextmanager
    def installed(self):
        """The train-mode batch-norm layers (yielded) normalise as above while inside."""
        layers = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for layer in layers:
            if layer not in self._forwards:
                self._forwards[layer] = functools.partial(_normalise_with_clean_statistics, layer, self)
            layer.forward = self._forwards[layer]
        try:
            yield layers
        finally:
            for layer in layers:
                del layer.forward  # back to the class's forward
            self.reuse([])  # keep no tensors alive between calls

    def record(self):
        self._recording, self._counts = [], []

    def recorded(self):
        recording, self._recording = self._recording, None
        return recording

    def reuse(self, statistics):
        self._given, self._next = statistics, 0

    def _take(self, layer, x):
        if self._recording is not None:  # the clean pass: measure
            mean, var, count = _batch_moments(layer, x)
            self._recording.append((mean, var))
            self._counts.append(count)  # values per channel: Python ints, kept here (a transform returns tensors)
            return mean, var
        mean, var = self._given[self._next]
        self._next += 1
        return mean, var

    @torch.no_grad()
    def update_running_stats(self, layers, statistics):
        """The running statistics' update of the clean pass (once per step, as nn.BatchNorm's)."""
        for layer, (mean, var), count in zip(layers, statistics, self._counts):
            if layer.track_running_stats:
                _update_running_stats(layer, mean.detach(), var.detach(), count)


def _normalise_with_clean_statistics(layer, clean, x):
    return _normalise(layer, x, *clean._take(layer, x))


def compile_fullgraph(fn, model, backend="inductor", mode=None):
    """torch.compile as the compiled paths use it: one graph (fullgraph), static shapes (a new batch
    size compiles once more instead of switching to dynamic shapes, which Inductor fails on here)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode,
                         options=inductor_options(model, backend, mode))


def inductor_options(model, backend="inductor", mode=None):
    """For a model on the CPU, Inductor keeps the convolutions' memory layout: its channels-last
    choice made mkldnn's convolutions slower (measured with bench.py on a 2-core CPU; our choice)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return {"layout_optimization": False} if on_cpu and backend == "inductor" and mode is None else None


def refuse_sync_batch_norm(model, what):
    """Compiled code here does not all-reduce SyncBatchNorm's statistics: refuse a multi-process run."""
    if any(_sync_group(m) is not None for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise RuntimeError(f"{what} does not all-reduce SyncBatchNorm's statistics across processes: use the "
                           f"eager path in a multi-process run")


class CompiledLLR:
    """`llr_loss(model, x, y, eps, lam, mu, steps, lr, generator, norm)` computed by compiled code,
    with the same semantics: the same loss, weight gradients and `info` (up to rounding), the same
    random start for the same generator, batch norm's clean statistics reused for every pass on
    x + δ and the running statistics updated once from the clean pass; ℓ∞ and ℓ2; bf16 autocast
    with the gap in float32.

        llr = CompiledLLR(model, steps=2)   # build it after model.to(device); it holds the model
        loss, info = llr(x, y, 8 / 255)     # the first call compiles (minutes for a large model)
        loss.backward()

    Why it can compile: torch.compile cannot trace `torch.autograd.grad(create_graph=True)`, but
    it traces `torch.func.grad`: ∇ₓℓ(x) becomes ordinary operations of the graph and AOTAutograd
    derives the weight gradient through it (the double backward) as a first-order backward.
    Three compiled pieces, each one graph, so that compile time does not grow with `steps`: the
    clean pass (ℓ(x), ∇ₓℓ(x) and the batch-norm statistics, `CleanBatchStatistics`), one step of
    the search (Adam in pixel units with torch.optim.Adam(maximize=True)'s update written out, or
    ℓ2's normalised step), and Eq. (8) at δ_LLR. The random start is drawn outside them from
    `generator` (compiled code draws nothing); the running statistics are updated outside them.
    ε, Adam's bias corrections, λ and μ enter as tensors: a new ε (warm-up) does not recompile.
    A batch of another size, a change of train/eval mode, dtype or autocast compiles the pieces
    once more (torch.compile keeps 8 versions): keep the batch size fixed (drop the last, smaller
    batch). With `nn.SyncBatchNorm` in a multi-process run it raises: use `llr_loss` there.

    backend, mode: torch.compile's ("inductor" needs a C++ compiler on a CPU and Triton on a GPU;
    "aot_eager" traces without generating code, a quick check).
    """

    def __init__(self, model, lam=2.0, mu=0.6, steps=10, lr=0.1, norm="linf", backend="inductor", mode=None):
        _check(0.0, norm)
        if steps < 0:
            raise ValueError(f"steps must be at least 0, got {steps}")
        _warn_if_relu(model)
        self.model, self.lam, self.mu, self.steps, self.lr, self.norm = model, lam, mu, steps, lr, norm
        self.clean = CleanBatchStatistics(model)
        self._clean_pass_c, self._search_step_c, self._eq8_c = (
            compile_fullgraph(f, model, backend, mode) for f in (self._clean_pass, self._search_step, self._eq8))

    def __call__(self, x, y, eps, generator=None):
        """(loss, info) as `llr_loss`: the mean of Eq. (8) over the batch, and detached per-sample
        `delta`, `gamma`, `grad_term`, `clean_loss` and the clean `logits`."""
        _check(eps, self.norm, x)
        refuse_sync_batch_norm(self.model, "CompiledLLR")
        eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        with self.clean.installed() as layers:
            logits, clean_loss, grad, statistics = self._clean_pass_c(x, y)
            self.clean.update_running_stats(layers, statistics)
            x_adv = _random_start(x, eps, generator, self.norm)
            with torch.no_grad():  # the search: no gradient flows to the weights
                fixed = (clean_loss.detach(), grad.detach(), [(m.detach(), v.detach()) for m, v in statistics])
                moments = (torch.zeros_like(x), torch.zeros_like(x))
                for t in range(1, self.steps + 1):
                    # Adam's bias-corrected step size and √(1 − β₂ᵗ), as torch.optim.Adam computes them;
                    # the ℓ2 step over ε
                    scalars = x.new_tensor([self.lr / (1 - 0.9 ** t), (1 - 0.999 ** t) ** 0.5, 2.5 / self.steps])
                    x_adv, moments = self._search_step_c(x, y, x_adv, moments, eps, scalars, *fixed)
            loss, gamma, grad_term = self._eq8_c(x, y, x_adv, clean_loss, grad, statistics,
                                                 torch.tensor([self.lam, self.mu], device=x.device))
        info = {"delta": x_adv - x, "gamma": gamma.detach(), "grad_term": grad_term.detach(),
                "clean_loss": clean_loss.detach(), "logits": logits.detach()}
        return loss, info

    # the compiled pieces (every model call normalises with the clean statistics)
    def _clean_pass(self, x, y):
        """Clean logits, ℓ(x) [B], ∇ₓℓ(x) (differentiable in the weights) and the statistics."""
        def summed_loss(x):
            self.clean.record()
            logits = self.model(x)
            statistics = self.clean.recorded()
            loss = F.cross_entropy(_float32_or_wider(logits), y, reduction="none")
            return loss.sum(), (logits, loss, statistics)

        grad, (logits, loss, statistics) = torch.func.grad(summed_loss, has_aux=True)(x)
        return logits, loss, grad, statistics

    def _gap(self, x, y, x_adv, clean_loss, grad, statistics):
        self.clean.reuse(statistics)
        return _gap(self.model, x, y, x_adv, clean_loss, grad)

    def _search_step(self, x, y, x_adv, moments, eps, scalars, clean_loss, grad, statistics):
        """One ascent step on g from x_adv, projected onto B(ε) ∩ [0, 1]."""
        ascent = torch.func.grad(lambda x_adv: self._gap(x, y, x_adv, clean_loss, grad, statistics).sum())(x_adv)
        m, v = moments
        if self.norm == "linf":  # torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-9, maximize=True), one step
            m = torch.lerp(m, -ascent, 0.1)
            v = v * 0.999 + ascent * ascent * 0.001
            x_adv = x_adv - scalars[0] * m / (v.sqrt() / scalars[1] + 1e-9)
        else:  # ℓ2: a step of 2.5·ε/steps along the normalised gradient, as `_Search`
            norm = ascent.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            x_adv = x_adv + scalars[2] * eps * ascent / norm
        return _project(x_adv, x, eps, self.norm), (m, v)

    def _eq8(self, x, y, x_adv, clean_loss, grad, statistics, weights):
        """Eq. (8) at δ_LLR = x_adv − x: (mean loss, γ [B], |δᵀ∇ₓℓ(x)| [B])."""
        gamma = self._gap(x, y, x_adv, clean_loss, grad, statistics)
        grad_term = _directional(x_adv - x, grad).abs()
        return (clean_loss + weights[0] * gamma + weights[1] * grad_term).mean(), gamma, grad_term


def _check(eps, norm, x=None):
    """The arguments every entry point shares, with one-line errors: the norm, ε as a number in pixel
    units, and images x in [0, 1] (a cheap min/max: normalised inputs would be clamped silently)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}; choose linf or l2")
    if isinstance(eps, str):
        raise ValueError(f"eps must be a number in pixel units, e.g. 8 / 255, not the string {eps!r}")
    if not 0 <= float(eps) <= (1 if norm == "linf" else 4):
        raise ValueError(f"eps must lie in [0, {1 if norm == 'linf' else 4}] (pixel units, e.g. 8/255), got {eps}")
    if x is not None:
        _check_images(x)


def _check_images(x):
    if x.numel():
        low, high = torch.aminmax(x.detach())
        if low < 0 or high > 1:
            raise ValueError(f"images must lie in [0, 1] (normalise inside the model), got values in "
                             f"[{low.item():.3g}, {high.item():.3g}]")


_WARNED_RELU = weakref.WeakSet()  # the models warned about already: once each


def _warn_if_relu(model):
    if model not in _WARNED_RELU and any(isinstance(m, nn.ReLU) for m in model.modules()):
        _WARNED_RELU.add(model)
        warnings.warn("LLR on a model with ReLU: zero curvature almost everywhere, so the double backward sees "
                      "only first-order terms; use a smooth activation such as softplus", stacklevel=3)


