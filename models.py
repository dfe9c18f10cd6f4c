"""Classifiers for llr, and their checkpoints.

Every model takes images in [0, 1] and normalises them inside `forward` (the
RobustBench convention), so ε is in pixel units everywhere and any attack library
can be pointed at it; GradAlign's CNN (cnn-*) uses the raw pixels, as theirs. LLR
differentiates through the input gradient, which needs a smooth activation:
softplus is the default; relu is there for comparisons.

    model = build_model("wrn-28-8", num_classes=10)            # paper's CIFAR-10 model
    model = build_model("resnet152", num_classes=1000, normalization="imagenet")
    model = build_model("lipconvnet-5-lln")                    # 1-Lipschitz, certifiable (soc.py)
    model = build_model("cnn-1x4", activation="relu")          # GradAlign's CNN: raw pixels, no normalisation
    model = build_model("timm:vit_small_patch16_224", num_classes=10,  # any timm model, its own GELU
                        timm_kwargs={"img_size": 32, "patch_size": 4})
    print(load_init(model, "vit_small.safetensors"))           # local weights in timm's layout (fine-tuning)
    save_checkpoint(model, "run/last.safetensors", epoch=3)
    model = load_checkpoint("run/last.safetensors")            # eval mode, [0, 1] inputs
"""
import ast
import json
import math
import os
import re

import torch
from torch import nn

import soc

NORMALIZATION = {  # per-channel (mean, std) of the training images
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),  # authors' datasets.py
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # raw [0, 1] pixels: (x - 0) / 1 is x exactly
}
ACTIVATIONS = {"softplus": nn.Softplus, "relu": nn.ReLU}
TIMM = "timm:"  # the prefix of a timm model's name: timm:vit_small_patch16_224
OWN = "own"  # a timm model's activation when --activation is not given: the model's own (GELU for ViT, Swin, ConvNeXt)
ARCHITECTURES = ("wrn-<depth>-<width> (e.g. wrn-28-8, wrn-40-8, wrn-34-10), preact-resnet18, resnet18, resnet50, "
                 "resnet152, cnn-<layers>x<filters> (GradAlign's CIFAR-10 CNN, no input normalisation; e.g. cnn-1x4), "
                 "lipconvnet-<depth>[-c<channels>][-ortho|-lln|-crc][-hh1][-lippool] (soc.py; e.g. "
                 "lipconvnet-5-lln), timm:<name> (any model of timm.list_models(), e.g. timm:vit_small_patch16_224, "
                 "timm:convnext_tiny; size arguments with --timm-kwargs)")


class ImageClassifier(nn.Module):
    """[0, 1] images [B, 3, H, W] → logits [B, K]: per-channel normalisation, then `net`.

    `config` holds what `build_model` needs to rebuild it; checkpoints store it.
    """

    def __init__(self, net, mean, std, config):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.config = config

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): BN-act-conv3x3, BN-act-conv3x3, plus
    the input, or a 1x1 projection of the first activation when the shape changes
    (as the authors' `wide_resnet.py` and ELLE's `PreActBlock`; fast_adversarial's, N-FGSM's
    and GradAlign's project the block's input instead)."""

    def __init__(self, in_channels, out_channels, stride, activation):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(in_channels), activation()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(out_channels), activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """conv3x3 stem, stages of `PreActBlock`s (the first of each may stride), BN-act,
    global average pooling, linear. Wide-ResNet-D-W (Zagoruyko & Komodakis 2016) is
    stem 16, widths (16W, 32W, 64W), (D-4)/6 blocks each, strides (1, 2, 2);
    PreAct ResNet-18 is stem 64, widths (64, 128, 256, 512), 2 blocks each."""

    def __init__(self, stem, widths, blocks, strides, num_classes, activation):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        layers, channels = [], stem
        for width, stride in zip(widths, strides):
            for i in range(blocks):
                layers.append(PreActBlock(channels, width, stride if i == 0 else 1, activation))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn, self.act = nn.BatchNorm2d(channels), activation()
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():  # He-normal convolutions, as the authors' wide_resnet.py
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        out = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(out.mean((2, 3)))


class CNN(nn.Module):
    """GradAlign's CNN (Andriushchenko & Flammarion 2020; their models.py:66-80, trained on raw [0, 1]
    pixels): `layers` 3x3 convolutions of `filters` channels (stride 1, padding 1, with bias), each
    followed by the activation, then one linear layer on the flattened filters·size·size features.
    Initialised as their utils.py:317-330 `initialize_weights`: conv weights N(0, 2/(3·3·filters)),
    linear weights N(0, 2/fan-in), biases 0, drawn in their order (convolutions, then linear), so a
    seed gives their weights. Their Fig. 11 model (README: --n_layers=1 --n_filters_cnn=4) is cnn-1x4."""

    def __init__(self, layers, filters, num_classes, activation, size=32):
        super().__init__()
        convs = []
        for i in range(layers):
            convs += [nn.Conv2d(3 if i == 0 else filters, filters, 3, padding=1), activation()]
        self.features = nn.Sequential(*convs)
        self.fc = nn.Linear(filters * size * size, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # their fan: k·k·out for a conv, in for a linear layer
                fan = 9 * m.out_channels if isinstance(m, nn.Conv2d) else m.in_features
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan))
                nn.init.zeros_(m.bias)

    def forward(self, x):  # [B, 3, 32, 32] -> [B, K]
        return self.fc(self.features(x).flatten(1))


def _torchvision_resnet(name, num_classes, activation):
    """torchvision's ResNet layout (bottlenecks, 7x7 stem) with every ReLU swapped."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    for module in list(net.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, activation())
    return net


def build_model(name, num_classes=10, activation=None, normalization="cifar10", timm_kwargs=None):
    """The classifier called `name` (see ARCHITECTURES), taking [0, 1] images.

    normalization: the dataset whose mean and std the model subtracts and divides by. GradAlign's
    cnn-* family takes raw pixels, as theirs: its normalization is "none" whatever is asked, and
    its input is CIFAR's 32 x 32 (ImageNet's is refused). A timm model (`timm:<name>`) is built as
    `_timm_model` says, with `timm_kwargs`; activation None is softplus here, a timm model's own there.
    """
    if name.startswith(TIMM):
        return _timm_model(name, num_classes, activation, timm_kwargs)
    if timm_kwargs:
        raise ValueError(f"--timm-kwargs are the size arguments of a timm: model, not of {name}")
    activation = "softplus" if activation is None else activation
    if normalization not in NORMALIZATION:
        raise ValueError(f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATION)}")
    lipconvnet = soc.parse_arch(name)
    if lipconvnet:  # 1-Lipschitz layers: the activation is part of the name (MaxMin unless -hh1)
        net = soc.LipConvNet(num_classes=num_classes, **lipconvnet)
        config = {"arch": name, "num_classes": num_classes, "activation": lipconvnet["activation"],
                  "normalization": normalization}
        return ImageClassifier(net, *NORMALIZATION[normalization], config)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    wrn, cnn = re.fullmatch(r"wrn-(\d+)-(\d+)", name), re.fullmatch(r"cnn-(\d+)x(\d+)", name)
    if cnn:
        if int(cnn[1]) < 1 or int(cnn[2]) < 1 or normalization == "imagenet":
            raise ValueError(f"{name}: GradAlign's CNN takes 32 x 32 CIFAR images with at least 1 layer of at least "
                             f"1 filter (e.g. cnn-1x4)")
        net, normalization = CNN(int(cnn[1]), int(cnn[2]), num_classes, act), "none"
    elif wrn:
        depth, width = int(wrn[1]), int(wrn[2])
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"{name}: a Wide-ResNet's depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...)")
        net = PreActResNet(16, [16 * width, 32 * width, 64 * width], (depth - 4) // 6, [1, 2, 2], num_classes, act)
    elif name == "preact-resnet18":
        net = PreActResNet(64, [64, 128, 256, 512], 2, [1, 2, 2, 2], num_classes, act)
    elif name in ("resnet18", "resnet50", "resnet152"):
        net = _torchvision_resnet(name, num_classes, act)
    else:
        raise ValueError(f"unknown architecture {name!r}; choose from {ARCHITECTURES}")
    config = {"arch": name, "num_classes": num_classes, "activation": activation, "normalization": normalization}
    return ImageClassifier(net, *NORMALIZATION[normalization], config)


# --------------------------------------------------------------------------- timm
def parse_timm_kwargs(items):
    """--timm-kwargs img_size=32 patch_size=4 depths=1,1 -> {"img_size": 32, "patch_size": 4, "depths": (1, 1)}:
    each value a Python literal (ast.literal_eval: numbers, True/False/None, a,b for a tuple), else a string
    (act_layer is --activation's). ValueError, one line, for an item without `=` or a repeated name."""
    kwargs = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier() or key in kwargs:
            raise ValueError(f"--timm-kwargs: {item!r} is not NAME=VALUE with a new NAME (e.g. img_size=32 "
                             f"depths=1,1)")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def _timm_model(name, num_classes, activation, timm_kwargs):
    """`timm.create_model(<name>, pretrained=False, num_classes=..., **timm_kwargs)` (timm's API; nothing is
    downloaded: weights come from `load_init`), wrapped to take [0, 1] images and normalise them with the mean
    and std of the model's `pretrained_cfg` (those its pretrained weights expect; our choice, also when training
    from scratch, so that a run and a fine-tuning see the same input). activation None or "own": the model's
    own (GELU in ViT, DeiT, Swin and ConvNeXt: smooth, as double backprop needs); softplus or relu: passed as
    timm's `act_layer`, refused in one line by a model that takes none (Swin). Dropout and stochastic depth
    are off (drop_rate=0, drop_path_rate=0: timm.create_model's documented arguments; Swin's default
    drop_path_rate is 0.1), and a model still stochastic in train mode is refused (our choice): their masks
    come from the global RNG, so LLR's passes on x and x + δ would see different networks, and a resumed run
    would not continue bit for bit. The config records `timm_kwargs` with tuples as lists (JSON): they
    rebuild the same model."""
    import timm

    arch = name[len(TIMM):]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r}; timm.list_models() lists them (e.g. vit_small_patch16_224, "
                         f"deit_small_patch16_224, swin_tiny_patch4_window7_224, convnext_tiny)")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (timm_kwargs or {}).items()}
    taken = sorted({"pretrained", "num_classes", "act_layer", "pretrained_cfg_overlay"} & set(kwargs))
    if taken:
        raise ValueError(f"--timm-kwargs {taken[0]}: set by llr (--init for weights, --activation for act_layer)")
    activation = OWN if activation is None else activation
    if activation not in (OWN, *ACTIVATIONS):
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}, or leave it unset "
                         f"for the model's own")
    act = {} if activation == OWN else {"act_layer": ACTIVATIONS[activation]}
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes,
                                **{"drop_rate": 0.0, "drop_path_rate": 0.0, **kwargs}, **act)
    except TypeError as e:
        if act and "act_layer" in str(e):
            raise ValueError(f"{name} takes no act_layer, so --activation {activation} cannot apply: leave "
                             f"--activation unset for the model's own") from None
        raise ValueError(f"timm cannot build {arch} with --timm-kwargs {kwargs}: {e}") from None
    except (AssertionError, ValueError, RuntimeError, IndexError, KeyError) as e:
        raise ValueError(f"timm cannot build {arch} with --timm-kwargs {kwargs}: {str(e) or type(e).__name__}") \
            from None
    stochastic = [n for n, m in net.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                  or getattr(m, "drop_prob", 0) > 0]
    if stochastic:
        raise ValueError(f"{name} with --timm-kwargs {kwargs} drops units at random in training ({stochastic[0]}): "
                         f"a different network in each of a step's passes; set its drop rates to 0")
    config = {"arch": name, "num_classes": num_classes, "activation": activation, "normalization": "timm",
              "timm_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    return ImageClassifier(net, net.pretrained_cfg["mean"], net.pretrained_cfg["std"], config)


def check_image_size(model, channels, height, width):
    """A one-line ValueError unless `model` classifies [2, channels, height, width] images (a forward pass
    in eval mode, no gradient): a ViT built for 224 px refuses 32 px images in timm's words."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, channels, height, width, device=next(model.parameters()).device))
    except (RuntimeError, AssertionError, ValueError) as e:
        hint = " (give img_size in --timm-kwargs)" if model.config["arch"].startswith(TIMM) else ""
        raise ValueError(f"{model.config['arch']} cannot take {channels}x{height}x{width} images{hint}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        model.train(was_training)


def load_init(model, path):
    """Load the weights of `model.net` (a `build_model` model) from `path`: safetensors, or a torch state dict
    (torch.load(weights_only=True)), in the network's own key layout (timm's for a timm: model, as
    `timm.create_model(...).state_dict()` and the hub's timm/*/model.safetensors hold it). Every key is checked:
    a missing, unexpected or mis-shaped tensor is a one-line ValueError naming the first of each. A timm
    model's classifier (its pretrained_cfg's `classifier`, e.g. head) of another class count is left as
    initialised, as timm's own `load_pretrained` does for a new num_classes. Returns a line saying what was
    loaded. Nothing is downloaded."""
    if not os.path.isfile(path):
        raise ValueError(f"--init {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file, in whatever words its reader has  # noqa: BLE001
        raise ValueError(f"--init {path}: cannot be read as safetensors or a torch state dict "
                         f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init {path}: not a state dict (a flat mapping of names to tensors)")
    expected = model.net.state_dict()
    classifier = getattr(model.net, "pretrained_cfg", {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head_keys = [k for k in expected if any(k.startswith(h + ".") for h in heads)]
    fresh = [k for k in head_keys if k in state and state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and k not in fresh and state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        named = [f"missing {missing[0]}" if missing else "", f"unexpected {unexpected[0]}" if unexpected else "",
                 f"{misshaped[0]} is {list(state[misshaped[0]].shape)} in the file, "
                 f"{list(expected[misshaped[0]].shape)} in the model" if misshaped else ""]
        sized = " with its --timm-kwargs" if model.config["arch"].startswith(TIMM) else ""
        raise ValueError(f"--init {path} does not match {model.config['arch']}{sized}: "
                         f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors "
                         f"({'; '.join(n for n in named if n)})")
    model.net.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=not fresh)
    kept = f"; {', '.join(fresh)} of another class count left as initialised (a new classifier)" if fresh else ""
    return f"--init: {len(state) - len(fresh)} tensors loaded from {path}{kept}"


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(model, path, **metadata):
    """Write the weights of a `build_model` model to `path` (safetensors), atomically
    (temporary file, then rename), with its config and any JSON-able `metadata`."""
    from safetensors.torch import save_file

    if not isinstance(model, ImageClassifier):
        raise TypeError(f"save_checkpoint takes the unwrapped model from build_model, got {type(model).__name__}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {"format": "llr-checkpoint-1", "config": json.dumps(model.config)}
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=header)
    _sort_header_metadata(tmp)
    os.replace(tmp, path)


def _sort_header_metadata(path):
    """Rewrite the safetensors file's header in place with its metadata keys sorted. safetensors
    writes them from a Rust HashMap, in an order that changes from call to call, so two identical
    checkpoints differed in their bytes; sorted, equal weights and metadata give equal sha256
    (bit-for-bit checks with sha256sum). The header keeps its length: the tensors do not move."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        assert len(text) <= length, "a reordered header cannot be longer than the original"
        f.seek(8)
        f.write(text.ljust(length, b" "))  # safetensors pads its header with spaces too


def read_checkpoint_metadata(path):
    """The config and metadata stored with a checkpoint, as a dict."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a safetensors checkpoint ({e})") from None
    if header.get("format") != "llr-checkpoint-1":
        raise ValueError(f"{path} is not an llr checkpoint (no model config stored in it)")
    return {k: json.loads(v) for k, v in header.items() if k != "format"}


def load_checkpoint(path, map_location="cpu"):
    """Rebuild the model stored at `path` and load its weights: an `nn.Module` in eval
    mode mapping [0, 1] images to logits, ready for any evaluation tool."""
    from safetensors.torch import load_file

    config = read_checkpoint_metadata(path)["config"]
    model = build_model(config["arch"], config["num_classes"], config["activation"], config["normalization"],
                        config.get("timm_kwargs"))
    state = load_file(path, device=str(map_location))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path} does not match {config['arch']}: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensors "
                         f"(e.g. {(missing + unexpected + mismatched)[0]})")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{path} holds NaN or inf weights ({len(broken)} tensors, e.g. {broken[0]}): it is not a "
                         f"trained model's checkpoint")
    model.load_state_dict(state)
    return model.to(map_location).eval()
