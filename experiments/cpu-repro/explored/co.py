"""The exploration behind `make cpu-repro` (a record, not a maintained tool): where does single-step
adversarial training collapse on a 2-core CPU? Trains small models with FGSM (zero or random
start, step alpha x eps) and logs, twice per epoch, clean / FGSM / PGD-20 accuracy and gamma on 500
held-out training images. Run from the repository root: python docs/cpu-repro/explored/co.py
--filters 4 --eps 10 --out res.jsonl (the commands are in commands.sh beside it)."""
import argparse, json, math, os, sys, time
sys.path.insert(0, os.getcwd())
import torch, torch.nn as nn, torch.nn.functional as F
import attacks, data, llr, models

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=1); p.add_argument("--filters", type=int, default=4)
p.add_argument("--act", default="softplus"); p.add_argument("--eps", type=float, default=10)
p.add_argument("--init", default="zero"); p.add_argument("--alpha", type=float, default=1.0)
p.add_argument("--epochs", type=int, default=30); p.add_argument("--lr", type=float, default=0.003)
p.add_argument("--opt", default="adam"); p.add_argument("--sched", default="cyclic")
p.add_argument("--wd", type=float, default=5e-4)
p.add_argument("--seed", type=int, default=0); p.add_argument("--method", default="fgsm", choices=["fgsm", "plain"])
p.add_argument("--evals-per-epoch", type=int, default=2); p.add_argument("--out", required=True)
p.add_argument("--threads", type=int, default=1); p.add_argument("--no-norm", action="store_true"); p.add_argument("--cnn", default=None); p.add_argument("--classes", default=None); p.add_argument("--train-n", type=int, default=0); p.add_argument("--eval-every", type=int, default=0); p.add_argument("--arch", default=None)
a = p.parse_args()
torch.set_num_threads(a.threads)
cache = "runs/explore-cifar-train.pt"  # the decoded training images, made once
if not os.path.exists(cache):
    xi, yi, _ = data.load_cifar10("data/cifar10-jpeg", "train")
    torch.save((xi, yi), cache)
xi, yi = torch.load(cache)
if a.classes:
    keep = [int(c) for c in a.classes.split(",")]
    mask = torch.isin(yi, torch.tensor(keep)); xi, yi = xi[mask], yi[mask]
    yi = torch.tensor([keep.index(int(v)) for v in yi])
xtr, ytr, xva, yva = xi[:-1000], yi[:-1000], xi[-1000:][:500], yi[-1000:][:500]
NC = len(a.classes.split(",")) if a.classes else 10
if a.train_n:
    xtr, ytr = xtr[:a.train_n], ytr[:a.train_n]
torch.manual_seed(a.seed)
class CNN(nn.Module):
    def __init__(s, L, Fn, act):
        super().__init__()
        layers = []
        for i in range(L):
            layers += [nn.Conv2d(3 if i == 0 else Fn, Fn, 3, 1, 1), nn.Softplus() if act == "softplus" else nn.ReLU()]
        s.f = nn.Sequential(*layers, nn.Flatten(), nn.Linear(Fn * 32 * 32, 10))
    def forward(s, x): return s.f(x)
def vgg(widths, act):
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.Softplus() if act == "softplus" else nn.ReLU()]
        c = w
        if i % 2 == 1: layers.append(nn.AvgPool2d(2))
    side = 32 // 2 ** (len(widths) // 2)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, NC))
if a.cnn:
    model = models.ImageClassifier(vgg([int(w) for w in a.cnn.split(",")], a.act), *models.NORMALIZATION["cifar10"], {})
elif a.arch:
    model = models.build_model(a.arch, 10, a.act)
else:
    model = models.ImageClassifier(CNN(a.layers, a.filters, a.act), *(((0., 0., 0.), (1., 1., 1.)) if a.no_norm else models.NORMALIZATION["cifar10"]), {})
opt = torch.optim.Adam(model.parameters(), lr=a.lr, weight_decay=a.wd) if a.opt == "adam" else \
      torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
eps = a.eps / 255
B = 128; spe = len(ytr) // B; total = a.epochs * spe
def lr_at(t):
    e = t / spe
    if a.sched == "const": return a.lr
    if a.sched == "cyclic": return float(torch.tensor(0.).new_tensor(0)) + (a.lr * e / (0.4 * a.epochs) if e < 0.4 * a.epochs else a.lr * (a.epochs - e) / (0.6 * a.epochs))
    return a.lr
def evaluate():
    model.eval()
    x, y = xva.float() / 255, yva
    with torch.no_grad(): clean = (model(x).argmax(1) == y).float().mean().item()
    xf = attacks.fgsm_k(model, x, y, eps, steps=1, step_size=eps)
    with torch.no_grad(): fg = (model(xf).argmax(1) == y).float().mean().item()
    xp = attacks.untargeted(model, x, y, eps, steps=20, restarts=1)
    with torch.no_grad(): pg = (model(xp).argmax(1) == y).float().mean().item()
    g, _ = llr.local_linearity(model, x[:100], y[:100], eps, steps=20, generator=torch.Generator().manual_seed(0))
    model.train()
    return dict(clean=clean, fgsm=fg, pgd=pg, gamma=g.mean().item())
out = open(a.out, "w"); out.write(json.dumps(vars(a)) + "\n"); out.flush()
t0 = time.time(); gen = torch.Generator().manual_seed(a.seed)
model.train()
for step in range(total):
    ep, i = divmod(step, spe)
    if i == 0: order = torch.randperm(len(ytr), generator=gen)
    idx = order[i * B:(i + 1) * B]
    x = data.crop_and_flip(xtr[idx].float() / 255, generator=gen); y = ytr[idx]
    for g_ in opt.param_groups: g_["lr"] = lr_at(step)
    if a.method == "fgsm":
        d = torch.zeros_like(x) if a.init == "zero" else (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
        d = (x + d).clamp(0, 1) - x
        d.requires_grad_(True)
        gr, = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)
        d = (d.detach() + a.alpha * eps * gr.sign()).clamp(-eps, eps)
        xa = (x + d).clamp(0, 1)
        loss = F.cross_entropy(model(xa), y)
    else:  # only FGSM was explored; plain as a reference
        assert a.method == "plain", a.method
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    due = ((step + 1) % (spe * a.eval_every) == 0) if a.eval_every else ((step + 1) % (spe // a.evals_per_epoch) == 0)
    if due:
        r = dict(epoch=(step + 1) / spe, loss=loss.item(), lr=lr_at(step), t=time.time() - t0, **evaluate())
        out.write(json.dumps(r) + "\n"); out.flush()
