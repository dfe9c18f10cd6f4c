"""models.py: every architecture builds and double-backpropagates; GradAlign's CNN against their
code; checkpoints round-trip."""
import math
import os

import pytest
import torch
from torch import nn

import llr
import models


@pytest.mark.parametrize("name, size", [("wrn-10-1", 16), ("wrn-16-2", 16), ("preact-resnet18", 16),
                                        ("resnet18", 32), ("resnet50", 32), ("resnet152", 64), ("cnn-2x4", 32)])
def test_every_model_runs_llr_double_backward(name, size):
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=5, normalization="imagenet" if "resnet1" in name else "cifar10")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.Softplus) for m in model.modules()) > 0
    x, y = torch.rand(2, 3, size, size), torch.tensor([0, 3])
    assert model(x).shape == (2, 5)
    loss, _ = llr.llr_loss(model, x, y, 4 / 255, steps=1)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name, params", [("wrn-34-10", 46_160_474), ("wrn-28-10", 36_479_194),
                                          ("preact-resnet18", 11_172_170)])
def test_parameter_counts_match_reference_implementations(name, params):
    """TRADES' WRN-34-10 and the usual WRN-28-10 / PreAct ResNet-18 sizes."""
    assert sum(p.numel() for p in models.build_model(name).parameters()) == params


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    model = models.build_model("wrn-10-1").eval()
    x = torch.rand(3, 3, 8, 8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in models.NORMALIZATION["cifar10"])
    torch.testing.assert_close(model(x), model.net((x - mean) / std))


class TheirCNN(nn.Module):
    """GradAlign's models.py:66-80 CNN (ReluWithStats is F.relu with statistics), transcribed."""

    def __init__(self, n_cls, shape_in, n_conv, n_filters):
        super().__init__()
        conv_blocks = []
        for i_layer in range(n_conv):
            n_in = shape_in[1] if i_layer == 0 else n_filters
            conv_blocks += [nn.Conv2d(n_in, n_filters, 3, stride=1, padding=1), nn.ReLU()]
        self._model = nn.Sequential(*conv_blocks, nn.Flatten(), nn.Linear(n_filters * shape_in[2] * shape_in[3], n_cls))

    def forward(self, x):
        return self._model(x)


def their_initialize_weights(module):
    """GradAlign's utils.py:317-330, transcribed (applied with model.apply, as their train.py:90)."""
    if isinstance(module, nn.Conv2d):
        n = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        module.weight.data.normal_(0, math.sqrt(2. / n))
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.Linear):
        n = module.in_features
        module.weight.data.normal_(0, math.sqrt(2. / n))
        if module.bias is not None:
            module.bias.data.zero_()


@pytest.mark.parametrize("layers, filters", [(1, 4), (3, 8)])
def test_gradalign_cnn_is_theirs(layers, filters):
    """cnn-<layers>x<filters>: their layers, their initialisation drawn in their order (the same seed
    gives the same weights), no input normalisation."""
    torch.manual_seed(3)
    theirs = TheirCNN(10, (50000, 3, 32, 32), layers, filters)
    theirs.apply(their_initialize_weights)
    torch.manual_seed(3)
    ours = models.build_model(f"cnn-{layers}x{filters}", activation="relu")
    assert ours.config["normalization"] == "none" and not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(ours(x), theirs(x)) and torch.equal(ours(x), ours.net(x))  # raw pixels in
    assert models.build_model("cnn-1x4", normalization="cifar10").config["normalization"] == "none"


def test_gradalign_cnn_initialisation_statistics():
    """Their N(0, 2/(3·3·filters)) convolutions, N(0, 2/fan-in) linear weights, zero biases."""
    torch.manual_seed(0)
    net = models.build_model("cnn-2x64").net
    second_conv, fc = net.features[2], net.fc
    assert second_conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.02)
    assert fc.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 32 * 32)), rel=0.02)
    assert all(m.bias.abs().max() == 0 for m in (net.features[0], second_conv, fc))


def test_relu_variant():
    model = models.build_model("preact-resnet18", activation="relu")
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, nn.Softplus) for m in model.modules())


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vgg16"), "unknown architecture 'vgg16'"),
    (dict(name="wrn-27-8"), "6n\\+4"),
    (dict(name="wrn-10-1", activation="gelu"), "unknown activation"),
    (dict(name="wrn-10-1", normalization="mnist"), "unknown normalization"),
    (dict(name="cnn-0x4"), "at least 1 layer"),
    (dict(name="cnn-1x4", normalization="imagenet"), "32 x 32 CIFAR images"),
])
def test_bad_names_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(**kwargs)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("wrn-10-1", num_classes=7, activation="relu")
    model(torch.rand(4, 3, 8, 8))  # move the running statistics away from their initial values
    path = str(tmp_path / "model.safetensors")
    models.save_checkpoint(model, path, epoch=3, eps=8 / 255)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind
    loaded = models.load_checkpoint(path)
    assert not loaded.training and loaded.config == model.config
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    cnn = models.build_model("cnn-1x4", activation="relu")  # no normalisation, recorded as such
    models.save_checkpoint(cnn, str(tmp_path / "cnn.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(models.load_checkpoint(str(tmp_path / "cnn.safetensors"))(x), cnn(x), rtol=0, atol=0)
    meta = models.read_checkpoint_metadata(path)
    assert meta["epoch"] == 3 and meta["eps"] == 8 / 255 and meta["config"]["num_classes"] == 7


def test_equal_checkpoints_are_equal_bytes(tmp_path):
    """The same weights and metadata saved five times give one sha256 (safetensors alone orders the
    header's metadata differently from call to call), and the file still reads back."""
    import hashlib

    model = models.build_model("cnn-1x4")
    metadata = dict(epoch=3, eps=8 / 255, norm="linf", method="llr", options={"lam": 4.0}, step=12, dataset="cifar10")
    digests = set()
    for i in range(5):
        models.save_checkpoint(model, str(tmp_path / f"{i}.safetensors"), **metadata)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    assert models.read_checkpoint_metadata(str(tmp_path / "0.safetensors"))["options"] == {"lam": 4.0}
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(models.load_checkpoint(str(tmp_path / "4.safetensors"))(x), model.eval()(x), rtol=0,
                               atol=0)


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        models.load_checkpoint(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        models.load_checkpoint(str(tmp_path / "junk.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an llr checkpoint"):
        models.load_checkpoint(str(tmp_path / "foreign.safetensors"))
    # weights of one architecture under the config of another
    path = str(tmp_path / "mixed.safetensors")
    models.save_checkpoint(models.build_model("wrn-10-1"), path)
    other = models.build_model("wrn-10-2")
    other.config = models.build_model("wrn-10-1").config
    models.save_checkpoint(other, path)
    with pytest.raises(ValueError, match="does not match wrn-10-1: .* mis-shaped"):
        models.load_checkpoint(path)
    with pytest.raises(TypeError, match="unwrapped model"):
        models.save_checkpoint(nn.Linear(2, 2), path)
