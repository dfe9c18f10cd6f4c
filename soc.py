"""Certified ℓ2 robustness with 1-Lipschitz networks: Skew Orthogonal Convolutions (SOC) and the
LipConvNets of Singla & Feizi, "Improved techniques for deterministic ℓ2 robustness" (NeurIPS 2022),
built after the authors' code (singlasahil14/improved_l2_robustness), written anew; torch only.

    net = LipConvNet(depth=5, last="lln")        # models.build_model("lipconvnet-5-lln") wraps it
    radius = certified_radius(model, x, y)       # per image, in input pixels (ℓ2); 0 if misclassified

A SOC layer computes exp(S)·x for a convolution S with a skew-symmetric filter (Sᵀ = −S), so the
layer is orthogonal: ‖exp(S)·v‖ = ‖v‖. The exponential is a Taylor series of `train_terms` (6)
terms in training and `eval_terms` (15) in evaluation, as the authors'; the filter is divided by a
power-method estimate of its norm so that the series converges fast. MaxMin and pairwise max
pooling are 1-Lipschitz, so the network's Lipschitz constant is bounded by the normalisation's
(1 / smallest std) times the product of the SOC layers' bounds (each 1 plus the truncated tail of
the series). A certificate is the logit margin divided by how fast the last layer can close it:

    ortho   (SOC 1x1 to the classes)        margin / (√2 · L)
    lln     (last-layer normalisation)      (z_y − z_j) / (‖w_y − w_j‖ · L), rows of W of norm 1
    crc     (CRC-Lip: linear, softplus, linear; contribution (a) of the paper): the margin
            g_j(f) = z_y − z_j has curvature bounded below by −m_j (softplus'' ≤ 1/4), so g_j > 0
            within (√(‖∇g_j‖² + 2·m_j·g_j) − ‖∇g_j‖) / m_j of the features f; divided by L.

−m_j is the exact smallest eigenvalue of W1ᵀ·diag(min(w2_y − w2_j, 0))·W1 / 4 (our choice; the
authors bound it by power iteration during training and certify with a tighter iterative dual
method, so our CRC-Lip certificates are sound and at most theirs). The fast SOC gradient of the
paper's contribution (b), used in training: the input gradient exactly (the transpose of the
series is the series of −S), the filter gradient from the last convolution of the series alone.
"""
import inspect
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

LAST_LAYERS = ("ortho", "lln", "crc")


def _transpose_filter(w):
    """The filter of the adjoint convolution (same padding): channels swapped, taps flipped."""
    return w.transpose(0, 1).flip(2, 3)


def _reshapes(w):
    """The filter [c, c, k, k] as the four matrices of Singla & Feizi's "Fantastic four" bound:
    ‖conv‖ ≤ k · min of their spectral norms."""
    c, _, k, _ = w.shape
    return [w.permute(0, 2, 1, 3).reshape(c * k, c * k), w.permute(0, 3, 1, 2).reshape(c * k, c * k),
            w.reshape(c, c * k * k), w.permute(0, 2, 3, 1).reshape(c * k * k, c)]


class _SeriesFastGradient(torch.autograd.Function):
    """Σ_{k≤n} S^k x / k! by Horner's scheme, with the paper's fast backward pass."""

    @staticmethod
    def forward(ctx, x, skew, n):
        pad = skew.shape[-1] // 2
        z = x
        for i in range(n, 1, -1):
            z = x + F.conv2d(z, skew, padding=pad) / i
        ctx.save_for_backward(z, skew)
        ctx.n = n
        return x + F.conv2d(z, skew, padding=pad)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z, skew = ctx.saved_tensors
        pad = skew.shape[-1] // 2
        g = grad_out
        for i in range(ctx.n, 1, -1):
            g = grad_out + F.conv2d(g, -skew, padding=pad) / i
        grad_skew = torch.nn.grad.conv2d_weight(z, skew.shape, g, padding=pad)
        return grad_out + F.conv2d(g, -skew, padding=pad), grad_skew, None


def _series(x, skew, n):
    """The same series with autograd's exact gradient."""
    pad = skew.shape[-1] // 2
    z = x
    for i in range(n, 0, -1):
        z = x + F.conv2d(z, skew, padding=pad) / i
    return z


class SOC(nn.Module):
    """Skew Orthogonal Convolution: in_channels → out_channels, kernel k, stride 1 or 2 (stride 2
    by an invertible space-to-depth rearrangement first); channels padded with zeros or dropped
    to match, then a bias. `fast_gradient` selects the paper's faster training gradient."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, train_terms=6, eval_terms=15,
                 fast_gradient=True):
        super().__init__()
        if stride not in (1, 2) or kernel_size % 2 == 0:
            raise ValueError("SOC takes stride 1 or 2 and an odd kernel size")
        self.stride, self.out_channels, self.in_channels = stride, out_channels, in_channels * stride * stride
        self.train_terms, self.eval_terms, self.fast_gradient = train_terms, eval_terms, fast_gradient
        channels = max(self.out_channels, self.in_channels)
        self.weight = nn.Parameter(torch.randn(channels, channels, kernel_size, kernel_size) / math.sqrt(channels))
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-1, 1) / math.sqrt(channels))
        # power-method vectors of the filter's four reshapes, whose norms bound its own (authors' SOC)
        for i, r in enumerate(_reshapes(self._skew().detach())):
            self.register_buffer(f"_u{i}", F.normalize(torch.randn(r.shape[1]), dim=0))
            self.register_buffer(f"_v{i}", F.normalize(torch.randn(r.shape[0]), dim=0))
        self._power_iterations(50)

    def _skew(self):
        return 0.5 * (self.weight - _transpose_filter(self.weight))

    @torch.no_grad()
    def _power_iterations(self, n):
        for i, r in enumerate(_reshapes(self._skew())):
            u = getattr(self, f"_u{i}")
            for _ in range(n):
                v = F.normalize(r @ u, dim=0)
                u = F.normalize(r.T @ v, dim=0)
            setattr(self, f"_u{i}", u)
            setattr(self, f"_v{i}", v)

    def scaled_skew(self):
        """The skew-symmetric filter divided by the smallest of the four norm estimates."""
        skew = self._skew()
        sigma = torch.stack([getattr(self, f"_v{i}") @ r @ getattr(self, f"_u{i}")
                             for i, r in enumerate(_reshapes(skew))])
        return skew / sigma.min()

    def forward(self, x):
        if self.training:
            self._power_iterations(1)
        skew = self.scaled_skew()
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        if self.out_channels > self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))
        n = (self.train_terms if self.training else self.eval_terms) - 1
        z = _SeriesFastGradient.apply(x, skew, n) if self.training and self.fast_gradient else _series(x, skew, n)
        return z[:, :self.out_channels] + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def lipschitz_bound(self):
        """An upper bound of the layer's ℓ2 Lipschitz constant at the evaluation term count: 1 plus
        the tail Σ_{k ≥ terms} s^k / k! of the series, with s = √(k·k) times the smallest exact norm
        of the filter's four reshapes, a bound of ‖S‖ for zero-padded convolution (Singla & Feizi
        2021, "Fantastic four"; a zero-padded convolution is a block of a circular one)."""
        skew = self.scaled_skew().double()
        s = skew.shape[-1] * min(torch.linalg.matrix_norm(r, ord=2).item() for r in _reshapes(skew))
        partial = sum(s ** i / math.factorial(i) for i in range(self.eval_terms))
        return 1.0 + max(math.exp(s) - partial, 0.0)


class MaxMin(nn.Module):
    """(a, b) → (max(a, b), min(a, b)) over the two halves of the channels: a 1-Lipschitz, gradient
    norm preserving activation (Anil et al. 2019)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class HouseHolder(nn.Module):
    """The order-1 Householder activation: each channel pair (a, b) is kept or reflected across
    the line at angle θ/2, whichever side it lies on; 1-Lipschitz (Singla et al. 2022)."""

    def __init__(self, channels):
        super().__init__()
        self.theta = nn.Parameter(torch.full((1, channels // 2, 1, 1), math.pi / 2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        t = self.theta
        reflect = a * torch.sin(t / 2) - b * torch.cos(t / 2) > 0
        a2, b2 = a * torch.cos(t) + b * torch.sin(t), a * torch.sin(t) - b * torch.cos(t)
        return torch.cat([torch.where(reflect, a2, a), torch.where(reflect, b2, b)], dim=1)


class MaxPool(nn.Module):
    """max(a, b) over the two halves of the channels: halves them, 1-Lipschitz."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.maximum(a, b)


class LipPool(nn.Module):
    """The paper's Lipschitz pooling (contribution (c)): each channel pair (a, b) → its signed ℓ2
    distance to a learned manifold (two rays at angle θ ∈ [0, π]), which is 1-Lipschitz."""

    def __init__(self, channels):
        super().__init__()
        self.theta = nn.Parameter(math.pi * torch.rand(1, channels // 2, 1, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        theta = self.theta.clamp(0, math.pi)
        angle = torch.atan2(b, a) % (2 * math.pi)
        first = angle < (theta + math.pi) / 2
        second = ~first & (angle < (3 * math.pi - theta) / 2)
        up = -a * torch.sin(theta / 2) + b * torch.cos(theta / 2)
        down = -a * torch.sin(theta / 2) - b * torch.cos(theta / 2)
        return torch.where(first, up, torch.where(second, torch.sqrt(a * a + b * b), down))


class LLNLinear(nn.Linear):
    """Last-layer normalisation: a linear layer whose weight rows are divided by their norms."""

    def unit_weight(self):
        return self.weight / self.weight.norm(dim=1, keepdim=True)

    def forward(self, x):
        return F.linear(x.flatten(1), self.unit_weight(), self.bias)


class CRCLip(nn.Module):
    """CRC-Lip's last layer: linear, softplus, linear (a 1-hidden-layer MLP on the features)."""

    def __init__(self, features, classes, hidden):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(features, hidden), nn.Linear(hidden, classes)
        self.register_buffer("_u", F.normalize(torch.randn(features), dim=0))

    def curvature_estimate(self, y):
        """[B] the training regulariser: the mean over j ≠ y of ¼‖√|min(w2_y − w2_j, 0)| ⊙ W1·u‖²,
        u the top right singular vector of W1 (one power iteration per call, kept in a buffer),
        an estimate from below of `curvature_bounds` that is cheap and differentiable."""
        with torch.no_grad():
            self._u = F.normalize(self.linear1.weight.T @ (self.linear1.weight @ self._u), dim=0)
        w2 = self.linear2.weight
        d = (w2[y][:, None] - w2[None]).clamp(max=0).abs()  # [B, K, hidden]
        m = (d * (self.linear1.weight @ self._u) ** 2).sum(2) / 4
        return m.sum(1) / (len(w2) - 1)  # the j = y term is 0

    def forward(self, x):
        return self.linear2(F.softplus(self.linear1(x.flatten(1))))

    @torch.no_grad()
    def curvature_bounds(self):
        """[K, K]: m[y, j] ≥ 0 such that g = z_y − z_j has curvature ≥ −m[y, j] everywhere. The Hessian
        of g is W1ᵀ·diag((w2_y − w2_j) ⊙ softplus'')·W1 with 0 ≤ softplus'' ≤ 1/4, so it is at least
        W1ᵀ·diag(d)·W1 / 4 with d = min(w2_y − w2_j, 0), whose smallest eigenvalue is
        −‖√|d| ⊙ W1‖₂², the largest eigenvalue of (√|d| √|d|ᵀ) ⊙ W1·W1ᵀ (exact, float64)."""
        w1, w2 = self.linear1.weight.double(), self.linear2.weight.double()
        gram = w1 @ w1.T
        scale = (w2[:, None] - w2[None]).clamp(max=0).abs().sqrt()  # [K, K, hidden]
        rows = [torch.linalg.eigvalsh(scale[y, :, :, None] * gram * scale[y, :, None, :])[:, -1]
                for y in range(len(w2))]
        return torch.stack(rows).clamp(min=0) / 4


class LipConvNet(nn.Module):
    """LipConvNet-`depth` (5, 10, ..., 40): an SOC layer (3x3) to `channels`, then five blocks of
    depth/5 SOC layers each ending in a stride-2 SOC and a pooling that halves the channels (the
    last block with 1x1 kernels, down to 1x1 pixels), then the `last` layer. Input: normalised
    images [B, 3, 32, 32]. As the authors' lip_convnets.py."""

    def __init__(self, depth=5, num_classes=10, channels=32, last="ortho", activation="maxmin", pooling="max",
                 hidden=None):
        super().__init__()
        if depth % 5 or not 5 <= depth <= 40:
            raise ValueError(f"LipConvNet depth must be 5, 10, ..., 40, got {depth}")
        if last not in LAST_LAYERS:
            raise ValueError(f"unknown last layer {last!r}; choose from {', '.join(LAST_LAYERS)}")
        act = {"maxmin": lambda c: MaxMin(), "hh1": HouseHolder}[activation]
        pool = {"max": lambda c: MaxPool(), "lippool": LipPool}[pooling]
        per_block = depth // 5
        layers = [SOC(3, channels, 3), act(channels)]
        c = channels
        for block in range(5):
            kernel = 1 if block == 4 else 3
            for i in range(per_block):
                stride = 2 if (i == per_block - 1 if block < 4 else i == 0) else 1
                layers.append(SOC(c, c * stride * stride, kernel, stride))
                c *= stride * stride
                if i == per_block - 1 and not (block == 4 and last == "crc"):
                    layers.append(pool(c))
                    c //= 2
                else:
                    layers.append(act(c))
        self.features = nn.Sequential(*layers)
        self.last_name = last
        if last == "ortho":
            self.last = SOC(c, num_classes, 1)
        elif last == "lln":
            self.last = LLNLinear(c, num_classes)
        else:
            self.last = CRCLip(c, num_classes, hidden or c)

    def forward(self, x):
        z = self.last(self.features(x))
        return z.flatten(1)

    def feature_lipschitz_bound(self):
        """A bound of the ℓ2 Lipschitz constant of `features` (activations and pooling: 1)."""
        return math.prod(m.lipschitz_bound() for m in self.features.modules() if isinstance(m, SOC))


@torch.no_grad()
def certificate_constants(model):
    """What a certificate needs of the weights alone, computed once per evaluation: the Lipschitz
    bound of the input → features map (normalisation included), the last layer's (ortho), the
    curvature bounds (crc)."""
    net = model.net
    if not isinstance(net, LipConvNet):
        raise ValueError(f"certificates need a lipconvnet model, got {model.config['arch']}")
    constants = {"features_lipschitz": net.feature_lipschitz_bound() / model.std.min().item()}
    if net.last_name == "ortho":
        constants["last_lipschitz"] = net.last.lipschitz_bound()
    if net.last_name == "crc":
        constants["curvature"] = net.last.curvature_bounds().to(model.std.device)
    return constants


def linear_margin_radii(net, logits, y, last_lipschitz=1.0):
    """[B, K] radii, in feature space, within which z_y − z_j stays positive, for the linear last
    layers (inf for j = y): ortho, margin / (√2 · the layer's Lipschitz bound); lln, margin /
    ‖w_y − w_j‖. Differentiable: with last_lipschitz 1, the training certificate of --method
    lipschitz."""
    margin = logits.gather(1, y[:, None]) - logits  # [B, K]
    if net.last_name == "lln":
        w = net.last.unit_weight()
        radii = margin / (w[y][:, None] - w[None]).norm(dim=2).clamp(min=1e-12)  # 0 for j = y: replaced
    else:
        radii = margin / (math.sqrt(2) * last_lipschitz)
    return radii.scatter(1, y[:, None], math.inf)


def _margin_radii(net, features, y, constants):
    """[B, K] radii, in feature space, within which z_y − z_j stays positive (inf for j = y)."""
    logits = net.last(features).flatten(1)
    if net.last_name != "crc":
        return linear_margin_radii(net, logits, y, constants.get("last_lipschitz", 1.0))
    margin = logits.gather(1, y[:, None]) - logits  # [B, K]
    f = features.flatten(1).detach().requires_grad_(True)
    with torch.enable_grad():
        z = net.last(f)
        grads = torch.stack([torch.autograd.grad(z[:, j].sum(), f, retain_graph=True)[0] for j in range(z.shape[1])], 1)
    grad_norm = (grads.gather(1, y[:, None, None].expand(-1, 1, f.shape[1])) - grads).norm(dim=2).double()
    m = constants["curvature"][y]  # [B, K]
    g = margin.double()
    curved = (torch.sqrt(grad_norm ** 2 + 2 * m * g.clamp(min=0)) - grad_norm) / m.clamp(min=1e-12)
    return torch.where(m > 0, curved, g / grad_norm).float().scatter(1, y[:, None], math.inf)


@torch.no_grad()
def certified_radius(model, x, y, constants=None):
    """[B] certified ℓ2 radii of a `models.build_model("lipconvnet-...")` model at [0, 1] images x
    with labels y: no perturbation of smaller norm changes the prediction away from y; 0 where the
    prediction is wrong. `constants`: `certificate_constants(model)`, computed here if not given.
    Evaluation mode."""
    was_training = model.training
    model.eval()
    try:
        constants = constants or certificate_constants(model)
        features = model.net.features((x - model.mean) / model.std)
        radii = _margin_radii(model.net, features, y, constants)
        return (radii.min(dim=1).values / constants["features_lipschitz"]).clamp(min=0)
    finally:
        model.train(was_training)


def parse_arch(name):
    """lipconvnet-<depth>[-c<channels>][-ortho|-lln|-crc][-hh1][-lippool] → every LipConvNet option
    (those the name leaves out at LipConvNet's defaults, the one place they are set), or None."""
    match = re.fullmatch(r"lipconvnet-(\d+)((?:-(?:c\d+|ortho|lln|crc|hh1|lippool))*)", name)
    if not match:
        return None
    options = {k: p.default for k, p in inspect.signature(LipConvNet).parameters.items() if k != "num_classes"}
    options["depth"] = int(match[1])
    for token in match[2].split("-")[1:]:
        if token[0] == "c" and token[1:].isdigit():
            options["channels"] = int(token[1:])
        elif token in LAST_LAYERS:
            options["last"] = token
        elif token == "hh1":
            options["activation"] = "hh1"
        else:
            options["pooling"] = "lippool"
    return options
