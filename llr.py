"""Local Linearity Regularisation (LLR) in PyTorch: one file, torch only. Copy it.

Qin et al., "Adversarial Robustness through Local Linearization", NeurIPS 2019 (arXiv:1907.02610).
For a classifier with per-sample cross-entropy loss ℓ(x):

    Eq. (5)  linearity gap       g(δ; x) = |ℓ(x + δ) − ℓ(x) − δᵀ∇ₓℓ(x)|
    Eq. (6)  local linearity     γ(ε, x) = max_{δ ∈ B(ε)} g(δ; x)
    Eq. (7)  the bound it gives  ℓ(x + δ) ≤ ℓ(x) + |δᵀ∇ₓℓ(x)| + γ(ε, x)  for all δ ∈ B(ε)
    Eq. (8)  LLR objective       ℓ(x) + λ·γ(ε, x) + μ·|δ_LLRᵀ∇ₓℓ(x)|,  δ_LLR = argmax of Eq. (6)

B(ε) is the ℓ∞ ball of radius ε (the paper's; `norm="l2"`: the ℓ2 ball), x + δ kept in [0, 1]. Minimising
Eq. (8) makes the loss locally linear, so the first-order term, which it also penalises, bounds the worst
case (Eq. 7): robustness without gradient obfuscation, for a few ascent steps instead of a full attack.

Usage (model maps images in [0, 1] to logits; smooth activations, e.g. softplus):

    loss, info = llr_loss(model, x, y, eps=8 / 255)   # the authors' λ = 2, μ = 0.6, 10 steps
    loss.backward()                                    # includes the double backward
    optimizer.step()

Conventions, so that results match the authors' code (google-deepmind/local_linearity_regularizer):
- δ_LLR is found by Adam on δ in pixel units (lr 0.1, β = (0.9, 0.999)) from a uniform random start in
  B(ε), projected onto B(ε) ∩ [0, 1] after every step; it maximises g alone, no gradient flows through it.
- ∇ₓℓ(x) is the input gradient of the batch's summed loss, kept in the graph (`create_graph=True`),
  so the weight gradient of γ and of |δᵀ∇ₓℓ(x)| includes second derivatives ("double backprop").
  ReLU networks have zero curvature almost everywhere: use softplus.
- Batch norm in train mode: every pass on x + δ is normalised with the batch statistics of the clean
  x (differentiably, as the authors' `get_stats`/`set_stats`), and only the clean pass updates the
  running statistics. See `CleanBatchStatistics`.

- Attention: a model calling `F.scaled_dot_product_attention` (timm's ViT, DeiT) gets PyTorch's fused kernels
  (flash, memory-efficient, the CPU's flash), which have no double backward (pytorch/pytorch#116350). The exact
  form's clean pass, the one whose input gradient is differentiated again, runs under `math_attention()` (the
  math backend: matmul, softmax, matmul); the search, the pass on x + δ and every pass of the first-order form
  keep the caller's kernels. Cost: the math backend materialises the attention matrix, memory ∝ tokens² per
  head and image (197² for a ViT at 224 px, patch 16).

`CompiledLLR(model, steps=2)(x, y, eps)` computes `llr_loss(model, x, y, eps, steps=2)` with the same
pieces compiled by torch.compile: faster where launches and memory traffic bound the eager double backward.

The first-order form, `llr_loss(..., first_order=True, h=0.1)` (ours; the question ELLE's ICLR 2024 reviewers
asked: LLR with its gradient term replaced by a finite difference). In Eq. (8) only, δᵀ∇ₓℓ(x) becomes the
central difference D_h = [ℓ(x + hδ) − ℓ(x − hδ)] / (2h) at δ = δ_LLR:

    γ_h = |ℓ(x + δ) − ℓ(x) − D_h|,    loss = ℓ(x) + λ·γ_h + μ·|D_h|

from one forward on the stacked [x, x + δ, x + hδ, x − hδ] and one ordinary backward: nothing is differentiated
twice, so it runs where double backprop does not (fused attention kernels, custom ops marked once_differentiable:
exact LLR stops there with one line naming the op), and `CompiledLLR(first_order=True)` runs across processes
(it averages the gradients of a DistributedDataParallel model itself). The search is unchanged (∇ₓℓ(x) taken
without a graph); x − hδ is not clipped to [0, 1] (a central difference needs both sides). What it changes,
measured (`experiments/first-order/`, wrn-10-1, softplus):
- Where batch statistics do not enter (no batch norm, or eval mode) it is LLR up to the truncation of the
  difference, ∝ h²: in float64 the weight gradient's relative error is 2.7e-5 at h = 0.1 and quarters with each
  halving of h. In float32, rounding takes over below h ≈ 0.1, where the error is least (1.9e-5): hence the
  default. The tests bound it at 1e-3 (float32, h = 0.1).
- Batch norm in train mode: both forms normalise x + δ with the clean batch's statistics, but the exact ∇ₓℓ(x)
  is the gradient of the batch's summed loss through those statistics, so δᵢᵀ∇ₓℓ also holds sample i's effect
  on the other samples' losses (batch norm's backward subtracts the batch mean of the gradients); D_h is the
  derivative of sample i's own loss with the statistics held fixed, the function that ℓ(x + δ) is computed
  with. The two differ by a term that does not shrink with the batch (B = 16 to 256: |δᵀ∇ₓℓ| 38-89%, γ 81-89%,
  the weight gradient 19-25% relative): with batch norm in train mode the first-order form regularises a
  different, self-consistent quantity, not the authors'. Use the exact form to reproduce the paper.
- Mixed precision: under autocast the stacked pass runs in float32. bf16 logits leave D_h at h = 0.1 about
  100% off (0.06 even at h = 1), while ∇ₓℓ(x) under autocast gives δᵀ∇ₓℓ to 0.6%; the clean pass and the
  search keep autocast.
- Cost: 4B rows forward and backward where the exact form has 2B forward and a double backward (counted in
  passes, a little more arithmetic); its gain is where the double backward is slow, impossible, or unreduced.
"""
import contextlib
import functools
import warnings
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

FIRST_ORDER_H = 0.1  # the first-order form's default step, h·δ_LLR (module docstring: why)

__all__ = ["linearity_gap", "local_linearity", "llr_loss", "CompiledLLR", "reuse_clean_batch_statistics",
           "CleanBatchStatistics", "math_attention"]


# --------------------------------------------------------------------------- the objective, Eqs. (5)-(8)
def _cross_entropy(logits, y):
    """ℓ per sample [B] from logits [B, K], in float32 at least, even under autocast."""
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) == len(y)):
        got = f"shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
        raise ValueError(f"the model must return logits [B, K] for B = {len(y)} images and labels [B], got {got}")
    return F.cross_entropy(_float32_or_wider(logits), y, reduction="none")


def _float32_or_wider(t):
    """t in float32 at least: bf16/fp16 from autocast is promoted, float64 kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _directional(delta, grad):
    """δᵀ∇ₓℓ(x) per sample: [B], in float32 at least."""
    return (_float32_or_wider(delta) * _float32_or_wider(grad)).flatten(1).sum(1)


def _gap(model, x, y, x_adv, clean_loss, grad):
    """Eq. (5) at δ = x_adv − x, given ℓ(x) and ∇ₓℓ(x): g per sample, [B]."""
    return (_cross_entropy(model(x_adv), y) - clean_loss - _directional(x_adv - x, grad)).abs()


def _eq8(model, x, y, x_adv, clean_loss, grad, lam, mu):
    """Eq. (8) at δ_LLR = x_adv − x: (mean loss, γ = g(δ_LLR; x) [B], |δ_LLRᵀ∇ₓℓ(x)| [B])."""
    gamma, grad_term = _gap(model, x, y, x_adv, clean_loss, grad), _directional(x_adv - x, grad).abs()
    return (clean_loss + lam * gamma + mu * grad_term).mean(), gamma, grad_term


def _eq8_first_order(clean_loss, adv_loss, plus, minus, h, lam, mu):
    """Eq. (8) with δᵀ∇ₓℓ(x) replaced by the central difference D_h = [ℓ(x + hδ) − ℓ(x − hδ)] / (2h), from the
    per-sample losses [B] on x, x + δ, x + hδ and x − hδ: (mean loss, γ_h = |ℓ(x + δ) − ℓ(x) − D_h| [B], |D_h| [B])."""
    difference = (plus - minus) / (2 * h)
    gamma, grad_term = (adv_loss - clean_loss - difference).abs(), difference.abs()
    return (clean_loss + lam * gamma + mu * grad_term).mean(), gamma, grad_term


def llr_loss(model, x, y, eps, lam=2.0, mu=0.6, steps=10, lr=0.1, generator=None, norm="linf", first_order=False,
             h=FIRST_ORDER_H):
    """Eq. (8): mean over the batch of ℓ(x) + λ·g(δ_LLR; x) + μ·|δ_LLRᵀ∇ₓℓ(x)|.

    model: maps images [B, ...] in [0, 1] to logits [B, K]. x: [B, ...] in [0, 1]. y: [B] integer labels.
    eps: radius of the ball in pixel units (8/255 for CIFAR-10 in ℓ∞). norm: "linf" (the paper's) or
    "l2" (the ball of the search; see `_ascent_step`). lam, mu: λ and μ of Eq. (8). steps, lr: the
    search's steps on δ, and Adam's learning rate (ℓ∞; ℓ2 steps are 2.5·ε/steps). The defaults are the
    authors' released CIFAR-10 config (`config.py`: 10 steps; their loss 2·CE + 4·(γ + 0.3·|δᵀ∇ₓℓ|) is
    twice this one with λ = 2, μ = 0.6; train it with SGD at lr 0.2 and weight decay 1e-4 to match their
    lr 0.1 and ℓ2 weight 2e-4 on that doubled loss). The paper uses 2 steps on ImageNet at ε = 4/255.
    generator: optional torch.Generator for the random start (the global RNG otherwise). first_order, h: the
    first-order form (module docstring): δᵀ∇ₓℓ(x) in the loss replaced by the central difference of step h·δ_LLR,
    no double backward (h is used by it alone).

    δ_LLR comes from `steps` ascent steps on g with no gradient through the search; γ is then g(δ_LLR; x),
    a lower bound on Eq. (6). The loss is differentiable with respect to the weights through ℓ(x),
    ℓ(x + δ_LLR) and ∇ₓℓ(x) (double backprop). Costs: one clean forward and input backward with graph,
    `steps` forward + input-backward passes, one forward on x + δ_LLR. Under torch.no_grad() the loss
    is measured, not differentiable. Images outside [0, 1] or requiring grad, labels not [B], a model
    that does not return logits [B, K] or a string ε raise ValueError; nn.ReLU modules warn once
    (a torch.relu or F.relu called in a forward is not seen: the warning looks at modules only).

    Returns (loss, info); info holds detached per-sample tensors: `delta` [B, ...], `gamma`, `grad_term`
    (|δ_LLRᵀ∇ₓℓ(x)|), `clean_loss` ([B] each) and the clean `logits` [B, K] (accuracy, no extra pass).
    """
    _check(eps, norm, x, y, first_order, h)
    _warn_if_relu(model, first_order)
    pieces = _LLR(model, steps, lr, norm, _autograd(create_graph=torch.is_grad_enabled() and not first_order),
                  first_order=first_order)
    return pieces(x, y, eps, lam, mu, generator, h=h)


def local_linearity(model, x, y, eps, steps=50, lr=0.1, generator=None, norm="linf"):
    """Eq. (6): γ(ε, x) = max_{δ ∈ B(ε), x + δ ∈ [0, 1]} g(δ; x), per sample, shape [B].

    The measurement of the paper's Fig. 2 and F3: `steps` steps of `llr_loss`'s search, keeping the best
    iterate of each sample: a lower bound on γ that never decreases with more steps (same model and
    `generator` state). Returns (gamma [B], delta [B, ...]), detached. Batch norm as in `linearity_gap`.
    """
    _check(eps, norm, x, y)
    pieces = _LLR(model, steps, lr, norm)
    with pieces.clean.installed(), torch.no_grad():
        fixed = _detached(*pieces.clean_pass(x, y)[1:])
        x_adv, moments = _random_start(x, eps, generator, norm), (torch.zeros_like(x), torch.zeros_like(x))
        best_gap, best_x = torch.full_like(fixed[0], -1.0), x_adv.clone()
        for t in range(1, steps + 2):  # g at the start and after each step; the last needs no gradient
            next_x, moments, gap = (pieces.search_step(x, y, x_adv, moments, eps, _adam_scalars(t, lr), *fixed)
                                    if t <= steps else (x_adv, moments, pieces.gap(x, y, x_adv, *fixed)))
            improved = gap > best_gap
            best_gap = torch.where(improved, gap, best_gap)
            best_x[improved] = x_adv[improved]
            x_adv = next_x
    return best_gap, best_x - x


def linearity_gap(model, x, y, delta):
    """Eq. (5): g(δ; x) = |ℓ(x + δ) − ℓ(x) − δᵀ∇ₓℓ(x)| for each sample, shape [B].

    x: images [B, ...] in [0, 1]; y: labels [B]; delta: shaped like x. Differentiable with respect to the
    weights when grad mode is on. Batch norm as in `llr_loss`, the running statistics left untouched.
    """
    _check_batch(x, y)
    pieces = _LLR(model, grad=_autograd(create_graph=torch.is_grad_enabled()))
    with pieces.clean.installed():
        return pieces.gap(x, y, x + delta, *pieces.clean_pass(x, y)[1:])


# --------------------------------------------------------------------------- the machinery
class _LLR:
    """An LLR step from three pieces, functions of tensors that `CompiledLLR` compiles as they are: the clean
    pass, one step of the search, Eq. (8); the batch-norm statistics go explicitly from the first to the
    others. `grad` is the paths' one difference: `_autograd` (eager, the reference) or `torch.func.grad`."""

    def __init__(self, model, steps=10, lr=0.1, norm="linf", grad=None, first_order=False):
        self.model, self.steps, self.lr, self.norm, self.first_order = model, steps, lr, norm, first_order
        self.grad = grad or _autograd()  # grad(f, has_aux=True)(x) -> (∇f(x), aux), as torch.func.grad
        self.clean = CleanBatchStatistics(model)

    def __call__(self, x, y, eps, lam, mu, generator=None, cast=lambda values: values, h=None):
        """(loss, info) of `llr_loss`. ε, λ, μ, h and Adam's scalars (`cast`) are numbers, or tensors in compiled
        code. The exact form keeps the clean pass's graph (∇ₓℓ(x) with create_graph); the first-order form takes
        ∇ₓℓ(x) for the search alone, with no graph to the weights, and computes Eq. (8) in one pass (`eq8_first_order`)."""
        with self.clean.installed():
            with torch.no_grad() if self.first_order else contextlib.nullcontext():
                logits, clean_loss, grad, statistics = self.clean_pass(x, y)
                if not self.first_order:
                    _refuse_missing_double_backward(self.model, grad)
            self.clean.update_running_stats(statistics)  # once per step, from the clean pass
            fixed = _detached(clean_loss, grad, statistics)
            x_adv, moments = _random_start(x, eps, generator, self.norm), (torch.zeros_like(x), torch.zeros_like(x))
            with torch.no_grad():  # the search: no gradient flows to the weights
                for t in range(1, self.steps + 1):
                    adam = cast(_adam_scalars(t, self.lr))
                    x_adv, moments, _ = self.search_step(x, y, x_adv, moments, eps, adam, *fixed)
            if self.first_order:
                loss, gamma, grad_term, logits, clean_loss = self.eq8_first_order(x, y, x_adv, h, lam, mu)
            else:
                loss, gamma, grad_term = self.eq8(x, y, x_adv, clean_loss, grad, statistics, lam, mu)
        return loss, {"delta": x_adv - x, "gamma": gamma.detach(), "grad_term": grad_term.detach(),
                      "clean_loss": clean_loss.detach(), "logits": logits.detach()}

    def clean_pass(self, x, y, grad=None):
        """Clean logits [B, K], ℓ(x) [B], ∇ₓℓ(x) [B, ...] and the batch-norm statistics of x (recorded inside);
        `grad` in place of the paths' own (CompiledLLR's eager clean pass)."""
        def summed_loss(x):
            self.clean.record()
            # the exact form differentiates this pass's input gradient again; the first-order form does not
            with contextlib.nullcontext() if self.first_order else math_attention():
                logits = self.model(x)
            loss = _cross_entropy(logits, y)
            return loss.sum(), (logits, loss, self.clean.recorded())
        grad, (logits, loss, statistics) = (grad or self.grad)(summed_loss, has_aux=True)(x)
        return logits, loss, grad, statistics

    def gap(self, x, y, x_adv, clean_loss, grad, statistics):
        self.clean.reuse(statistics)
        return _gap(self.model, x, y, x_adv, clean_loss, grad)

    def search_step(self, x, y, x_adv, moments, eps, adam, clean_loss, grad, statistics):
        """One ascent step on g from x_adv: (x_adv, moments) after it, and g at x_adv [B]."""
        def summed_gap(x_adv):
            gap = self.gap(x, y, x_adv, clean_loss, grad, statistics)
            return gap.sum(), gap.detach()  # samples are independent: the gradient of the sum
        ascent, gap = self.grad(summed_gap, has_aux=True)(x_adv)
        return *_ascent_step(x, x_adv, ascent, moments, eps, adam, self.norm, self.steps), gap

    def eq8(self, x, y, x_adv, clean_loss, grad, statistics, lam, mu):
        self.clean.reuse(statistics)
        return _eq8(self.model, x, y, x_adv, clean_loss, grad, lam, mu)

    def eq8_first_order(self, x, y, x_adv, h, lam, mu):
        """The first-order Eq. (8) from one forward on [x, x + δ, x + hδ, x − hδ] (4B rows; batch norm measures the
        statistics of the first B, the clean x, with their graph, and normalises every row with them) and one
        ordinary backward: (mean loss, γ_h [B], |D_h| [B], clean logits [B, K], ℓ(x) [B])."""
        delta = x_adv - x
        self.clean.record(rows=len(x))
        with torch.autocast(x.device.type, enabled=False):  # in float32: bf16 logits do not resolve D_h (docstring)
            logits = self.model(_float32_or_wider(torch.cat([x, x_adv, x + h * delta, x - h * delta])))
        self.clean.recorded()
        losses = _cross_entropy(logits, y.repeat(4)).view(4, len(x))  # ℓ on x, x + δ, x + hδ, x − hδ: [4, B]
        return (*_eq8_first_order(*losses, h, lam, mu), logits[:len(x)], losses[0])


@contextlib.contextmanager
def math_attention():
    """Inside, `F.scaled_dot_product_attention` runs by its math backend alone (matmul, softmax, matmul: ordinary
    operations, differentiable to any order); on exit the caller's choice of backends is restored
    (`torch.nn.attention.sdpa_kernel`, torch's API). For a pass whose input gradient is differentiated again:
    the fused kernels have no double backward (pytorch/pytorch#116350). The backend is chosen at the forward,
    so only the forward needs to be inside. Costs memory ∝ tokens² (the attention matrix is materialised)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _autograd(create_graph=False):
    """torch.func.grad's interface over torch.autograd.grad (eager): grad(f, has_aux=True)(x) is (∇f(x), aux)
    for f(x) = (scalar, aux), even under no_grad; `create_graph` keeps ∇f differentiable (double backprop)."""
    def grad(f, has_aux):
        def at(x):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                value, aux = f(x)
                return torch.autograd.grad(value, x, create_graph=create_graph)[0], aux
        return at
    return grad


def _detached(clean_loss, grad, statistics):
    return clean_loss.detach(), grad.detach(), {i: (m.detach(), v.detach()) for i, (m, v) in statistics.items()}


def _ascent_step(x, x_adv, ascent, moments, eps, adam, norm, steps):
    """One step of the search for δ_LLR along ascent = ∇g(x_adv), projected onto B(ε) ∩ [0, 1]: (x_adv, moments).
    ℓ∞: Adam in pixel units, the authors' `UnrolledAdam` (`_adam_step`). ℓ2: 2.5·ε/steps along ascent/‖ascent‖₂,
    as ℓ2 PGD (our choice: Adam's steps are ℓ∞-shaped, a sign pattern)."""
    if norm == "linf":
        x_adv, m, v = _adam_step(x_adv, ascent, *moments, *adam)
        return _project(x_adv, x, eps), (m, v)
    length = ascent.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return _project(x_adv + _step_size(eps, steps) * ascent / length, x, eps, "l2"), moments


def _step_size(eps, steps):
    """The common rule for the steps of a projected ascent: 2.5·ε/steps."""
    return 2.5 * eps / max(steps, 1)


def _adam_scalars(t, lr):
    """Adam's bias-corrected step size lr/(1 − β₁ᵗ) and √(1 − β₂ᵗ) at step t ≥ 1, as torch.optim.Adam's."""
    return lr / (1 - 0.9 ** t), (1 - 0.999 ** t) ** 0.5


def _adam_step(x_adv, grad, m, v, step_size, root):
    """One ascent step of Adam along `grad` (β = (0.9, 0.999), eps 1e-9: the authors' UnrolledAdam), not projected:
    (x_adv, m, v). torch.optim.Adam(maximize=True)'s operations in its order: eager results equal its (on a CPU)."""
    m = torch.lerp(m, grad, 1 - 0.9)
    v = torch.addcmul(v * 0.999, grad, grad, value=1 - 0.999)
    return x_adv + step_size * m / (v.sqrt() / root + 1e-9), m, v


def _project(x_adv, x, eps, norm="linf"):
    """A point of B(ε) ∩ [0, 1] for x_adv. ℓ∞: clip to the ball around x, then to the box (the nearest point).
    ℓ2: scale x_adv − x into the ball, then clip to the box (as ℓ2 PGD; it stays in the ball, x being in the box)."""
    if norm == "linf":
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    delta = x_adv - x
    scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
    return (x + delta * scale.view(-1, *[1] * (x.dim() - 1))).clamp(0, 1)


def _random_start(x, eps, generator=None, norm="linf"):
    """x + δ with δ uniform in B(ε) (ℓ2: a Gaussian direction, radius ε·U^(1/d)), projected into [0, 1], as the
    authors' `pgd_attack` starts."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return _project(x + (2 * noise - 1) * eps, x, eps)
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = eps * torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype) ** (1 / x[0].numel())
    scale = radius / direction.flatten(1).norm(dim=1).clamp_min(1e-12)
    return _project(x + direction * scale.view(-1, *[1] * (x.dim() - 1)), x, eps, norm)


# --------------------------------------------------------------------------- batch norm
class CleanBatchStatistics:
    """Batch norm with explicit statistics, as the authors' `get_stats`/`set_stats` (`batchnorm.py`): while
    `installed()`, each batch-norm layer in train mode normalises with its entry of `statistics` ({layer index:
    (mean, biased variance)}, float32), measured by its first pass if it has none. The clean pass records them,
    every pass on x + δ reuses them: the loss of each perturbed sample depends on its own input only.

        with clean.installed():                                    # clean = CleanBatchStatistics(model)
            clean.record(); model(x); statistics = clean.recorded()   # the clean pass (compiled code
            clean.update_running_stats(statistics)                  # records and reuses inside its graphs,
            clean.reuse(statistics); model(x + delta)               # statistics in and out as tensors)

    The statistics are tensors of the autograd graph, differentiable to any order, unlike `nn.SyncBatchNorm`'s
    kernels (in a multi-process run they are reduced over its group, as it does). Eval-mode layers are left
    alone; the forwards installed are the same objects at every call, so compiled code does not recompile."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._forwards = [functools.partial(self._forward, i) for i in range(len(self.layers))]
        self.statistics, self._counts, self._rows = {}, {}, None

    @contextlib.contextmanager
    def installed(self):
        training = [i for i, layer in enumerate(self.layers) if layer.training]
        for i in training:
            self.layers[i].forward = self._forwards[i]
        try:
            yield
        finally:
            for i in training:
                del self.layers[i].forward  # back to the class's forward
            self.statistics = {}  # keep no tensors alive between calls

    def _forward(self, i, x):
        if i not in self.statistics:  # the first pass: measure (on its first `rows` samples, when set)
            mean, var, self._counts[i] = _batch_moments(self.layers[i], x if self._rows is None else x[:self._rows])
            self.statistics[i] = (mean, var)
        return _normalise(self.layers[i], x, *self.statistics[i])

    def record(self, rows=None):
        """Measure afresh at the next pass: on all its samples, or on its first `rows` (the clean x of a batch
        that stacks x with its perturbations)."""
        self.statistics, self._counts, self._rows = {}, {}, rows  # new dicts: compiled code does not guard on the old ones

    def recorded(self):
        statistics, self.statistics, self._rows = self.statistics, {}, None
        return statistics

    def reuse(self, statistics):
        self.statistics = statistics

    @torch.no_grad()
    def update_running_stats(self, statistics):
        """nn.BatchNorm's update in train mode (unbiased variance, momentum or cumulative), from `statistics`."""
        for i, (mean, var) in statistics.items():
            layer, count = self.layers[i], self._counts[i]
            if layer.track_running_stats:
                if count < 2:
                    raise ValueError(f"batch norm needs more than 1 value per channel in train mode, got {count}")
                layer.num_batches_tracked += 1
                momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
                layer.running_mean.lerp_(mean.detach().to(layer.running_mean.dtype), momentum)
                layer.running_var.lerp_((var.detach() * count / (count - 1)).to(layer.running_var.dtype), momentum)


@contextlib.contextmanager
def reuse_clean_batch_statistics(model, update_running_stats=False):
    """`CleanBatchStatistics` for code calling the model as usual: each train-mode batch-norm layer normalises *all* its
    passes with the statistics of its *first* (the clean x), which update its running ones at exit if asked."""
    clean = CleanBatchStatistics(model)
    with clean.installed():
        yield
        if update_running_stats:
            clean.update_running_stats(clean.statistics)


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
    var, mean = torch.var_mean(_float32_or_wider(x), dim=[0, *range(2, x.dim())], correction=0)
    count = x.numel() // x.shape[1]
    group = _sync_group(layer)
    if group is None:
        return mean, var, count
    # the processes' moments combined exactly (Chan et al.), as nn.SyncBatchNorm does, by all-reduces (differentiable)
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


# --------------------------------------------------------------------------- compiled
class CompiledLLR(_LLR):
    """`llr_loss(model, x, y, eps, lam, mu, steps, lr, generator, norm)` by compiled code: the same loss, weight
    gradients and `info` up to rounding (ℓ∞ and ℓ2, bf16 autocast, the same random start).

        llr = CompiledLLR(model, steps=2)   # after model.to(device); it holds the model
        loss, info = llr(x, y, 8 / 255)     # the first call compiles (minutes for a large model)

    torch.compile cannot trace `torch.autograd.grad(create_graph=True)`, but it traces `torch.func.grad`: ∇ₓℓ(x)
    becomes ordinary operations of the graph and AOTAutograd derives the double backward as a first-order
    backward. `llr_loss`'s three pieces compile to one graph each (compile time does not grow with `steps`);
    the random start is drawn and the running statistics updated outside them. ε, Adam's bias corrections, λ
    and μ enter as tensors: a new ε (warm-up) does not recompile; a batch of another size, a change of mode,
    dtype or autocast compiles once more (up to 8 versions): drop the last, smaller batch. Across processes
    (a DistributedDataParallel model, `nn.SyncBatchNorm`) only the first-order form runs; the exact form raises:
    use `llr_loss` there. The first call runs the model once
    eagerly (no_grad, running statistics untouched) to check that it returns logits [B, K]. backend, mode,
    options: torch.compile's ("aot_eager" traces without generating code, a quick check)."""

    def __init__(self, model, lam=2.0, mu=0.6, steps=10, lr=0.1, norm="linf", first_order=False, h=FIRST_ORDER_H,
                 backend="inductor", mode=None, options=None):
        _check(0.0, norm, first_order=first_order, h=h)
        if steps < 0:
            raise ValueError(f"steps must be at least 0, got {steps}")
        _warn_if_relu(model, first_order)
        self.group = _ddp_group(model)  # the processes whose gradients are averaged, when DDP wraps the model
        if self.group is not None and not first_order:
            raise ValueError("CompiledLLR's exact form across processes is untested (its gradients are taken past "
                             "DistributedDataParallel's forward): use first_order=True, or the eager llr_loss")
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        super().__init__(model, steps, lr, norm, torch.func.grad, first_order)
        self.lam, self.mu, self.h, self._checked = lam, mu, h, False
        self._compiled_clean_pass, self.search_step, self.eq8, self.eq8_first_order = (
            torch.compile(f, fullgraph=True, dynamic=False, backend=backend, mode=mode, options=options)
            for f in (super().clean_pass, self.search_step, self.eq8, self.eq8_first_order))

    def clean_pass(self, x, y):
        """The compiled clean pass; eager (autograd) under SyncBatchNorm across processes, whose statistics the
        first-order clean pass measures: torch.func cannot differentiate its all-reduces (an autograd.Function
        without setup_context)."""
        if any(_sync_group(layer) is not None for layer in self.clean.layers):
            return super().clean_pass(x, y, grad=_autograd())
        return self._compiled_clean_pass(x, y)

    def __call__(self, x, y, eps, generator=None):
        """(loss, info) as `llr_loss(model, x, y, eps, ...)`: the mean of Eq. (8), and info's detached tensors."""
        _check(eps, self.norm, x, y)
        if not self.first_order and any(_sync_group(layer) is not None for layer in self.clean.layers):
            raise RuntimeError("CompiledLLR's exact form does not all-reduce SyncBatchNorm's statistics across "
                               "processes: use first_order=True, or the eager path (llr_loss) in a multi-process run")
        if not self._checked:  # a one-line error for a model that does not return logits, before compiling
            with self.clean.installed(), torch.no_grad():
                _cross_entropy(self.model(x), y)
            self._checked = True
        tensor = functools.partial(torch.as_tensor, dtype=x.dtype, device=x.device)
        loss, info = super().__call__(x, y, tensor(eps), tensor(self.lam), tensor(self.mu), generator, cast=tensor,
                                      h=tensor(self.h))
        if self.group is not None and torch.is_grad_enabled():
            loss = _AverageGradients.apply(loss, self.group, *self.model.parameters())
        return loss, info


def _ddp_group(model):
    """The process group of a DistributedDataParallel model across more than one process, else None."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    return model.process_group if dist.get_world_size(model.process_group) > 1 else None


class _AverageGradients(torch.autograd.Function):
    """The identity on the loss, whose backward has every parameter's gradient averaged over `group` at the end of
    the backward pass (one all-reduce of the gradients flattened, queued as DistributedDataParallel queues its own):
    DDP's reduction for compiled code, which calls the module past DDP's forward (torch.compile cannot trace DDP's
    forward in one graph). Every process reduces every parameter (zeros where one has no gradient), in one order."""

    @staticmethod
    def forward(ctx, loss, group, *parameters):
        ctx.group, ctx.parameters = group, [p for p in parameters if p.requires_grad]
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        def average():
            for p in ctx.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in ctx.parameters]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=ctx.group)
            flat /= dist.get_world_size(ctx.group)
            for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(reduced.view_as(g))
        torch.autograd.Variable._execution_engine.queue_callback(average)
        return grad, None, *[None] * len(ctx.parameters)


# --------------------------------------------------------------------------- checks
_NO_DOUBLE_BACKWARD = ("torch::autograd::NotImplemented", "torch::autograd::DelayedError", "torch::autograd::Error")


def _refuse_missing_double_backward(model, grad, method="exact LLR",
                                    remedy="use the first-order form, llr_loss(..., first_order=True) (train_*.py: "
                                           "--llr-first-order)"):
    """Once per model, before the backward that would fail: a one-line RuntimeError naming the op whose backward has no
    derivative (a fused attention kernel, an autograd.Function marked once_differentiable), `method` and `remedy`,
    in place of PyTorch's error at loss.backward(). Searches the graph of ∇ₓℓ (eager, with create_graph) once."""
    if model in _CHECKED_DOUBLE_BACKWARD or grad.grad_fn is None:
        return
    seen, stack, missing = set(), [grad.grad_fn], None
    while stack and missing is None:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        missing = node if node.name() in _NO_DOUBLE_BACKWARD else None
        stack.extend(f for f, _ in node.next_functions)
    if missing is None:
        _CHECKED_DOUBLE_BACKWARD.add(model)
        return
    what = "an autograd.Function marked once_differentiable"
    if missing.name().endswith("NotImplemented"):
        for count in range(1, 9):  # PyTorch's message names the op: call the node alone (its arity is not exposed)
            try:
                missing(*[torch.ones(())] * count)
            except TypeError:
                continue
            except RuntimeError as e:
                what = str(e).split("derivative for ")[-1].split(" is not implemented")[0].strip()
            break
    raise RuntimeError(f"{method} differentiates the input gradient again, and {what} in the model has no double "
                       f"backward: {remedy}")

def _check(eps, norm, x=None, y=None, first_order=False, h=FIRST_ORDER_H):
    """One-line errors for the norm, ε as a number in pixel units, the first-order step h, and the batch."""
    if first_order and not (isinstance(h, (int, float)) and 0 < h <= 1):
        raise ValueError(f"h, the first-order difference's step as a fraction of δ_LLR, must lie in (0, 1], got {h!r}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}; choose linf or l2")
    if isinstance(eps, str):
        raise ValueError(f"eps must be a number in pixel units, e.g. 8 / 255, not the string {eps!r}")
    if not 0 <= float(eps) <= (1 if norm == "linf" else 4):
        raise ValueError(f"eps must lie in [0, {1 if norm == 'linf' else 4}] (pixel units, e.g. 8/255), got {eps}")
    if x is not None:
        _check_batch(x, y)


def _check_batch(x, y):
    """Images x [B, ...] in [0, 1] (normalised ones would be clamped silently) not requiring grad, labels y [B]."""
    if x.requires_grad:
        raise ValueError("images x must not require grad (LLR differentiates in the weights): pass x.detach()")
    if x.numel():
        low, high = torch.aminmax(x.detach())
        if low < 0 or high > 1:
            raise ValueError(f"images must lie in [0, 1] (normalise inside the model), got values in "
                             f"[{low.item():.3g}, {high.item():.3g}]")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x),):
        raise ValueError(f"labels y must be [B] = [{len(x)}] for images x {list(x.shape)}, got "
                         f"{list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")


_WARNED_RELU = weakref.WeakSet()  # the models warned about already: once each
_CHECKED_DOUBLE_BACKWARD = weakref.WeakSet()  # the models whose graph has been searched for ops without one


def _warn_if_relu(model, first_order=False):
    """Once per model with an nn.ReLU module (functional relu in a forward is not seen): the exact form's double
    backward sees no curvature through ReLU; the first-order form's differences do see its kinks (no warning)."""
    if first_order:
        return
    if model not in _WARNED_RELU and any(isinstance(m, nn.ReLU) for m in model.modules()):
        _WARNED_RELU.add(model)
        warnings.warn("LLR on a model with ReLU: zero curvature almost everywhere, so the double backward sees "
                      "only first-order terms; use a smooth activation such as softplus", stacklevel=3)
