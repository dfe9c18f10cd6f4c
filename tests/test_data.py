"""data.py: on-device augmentation against a per-image reference; folder loading and its errors."""
import pytest
import torch
import torch.nn.functional as F

import data
from conftest import make_image_folder


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_and_flip_matches_a_per_image_reference(mode):
    """reflect: F.pad's mirror (the LLR authors'); zeros: torchvision's RandomCrop(padding=2) with
    its default fill 0 and RandomHorizontalFlip, replayed with torchvision's own functions."""
    from torchvision.transforms import functional as TF

    images = torch.rand(16, 3, 6, 5)
    out = data.crop_and_flip(images, padding=2, generator=torch.Generator().manual_seed(0), mode=mode)
    # replay the generator: the same draws, applied image by image
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 5, (16, 1, 1), generator=g).flatten()
    left = torch.randint(0, 5, (16, 1, 1), generator=g).flatten()
    flip = (torch.rand(16, 1, 1, generator=g) < 0.5).flatten()
    assert flip.any() and (~flip).any()
    for i in range(16):
        if mode == "reflect":
            crop = F.pad(images[i:i + 1], (2, 2, 2, 2), mode="reflect")[0][:, top[i]:top[i] + 6, left[i]:left[i] + 5]
        else:
            crop = TF.crop(TF.pad(images[i], [2]), int(top[i]), int(left[i]), 6, 5)
        torch.testing.assert_close(out[i], TF.hflip(crop) if flip[i] else crop, rtol=0, atol=0)
    if mode == "zeros":
        assert (out == 0).any()  # some crop reaches into the black border
    with pytest.raises(ValueError, match="unknown padding mode 'constant'"):
        data.crop_and_flip(images, mode="constant")


def test_image_folder_loads_in_a_fixed_mixed_order(tmp_path):
    make_image_folder(str(tmp_path), classes=3, per_class=4, size=8)
    images, labels, classes = data.load_cifar10(str(tmp_path), "test")
    assert images.shape == (12, 3, 8, 8) and images.dtype == torch.uint8
    assert classes == ["class0", "class1", "class2"] and sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert labels.tolist() != sorted(labels.tolist())  # not sorted by class
    again, labels_again, _ = data.load_cifar10(str(tmp_path), "test")
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    # the generated colour cue survives JPEG: class c is brightest in channel c
    assert (images.float().mean((2, 3)).argmax(1) == labels).all()


def test_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="no CIFAR-10 at .*--data-dir"):
        data.load_cifar10(str(tmp_path / "missing"), "train")
    make_image_folder(str(tmp_path / "a"), splits=("test",), classes=2, per_class=1)
    with pytest.raises(data.DataError, match="no folder"):
        data.load_cifar10(str(tmp_path / "a"), "train")
    (tmp_path / "a" / "test" / "class0" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match="cannot decode"):
        data.load_cifar10(str(tmp_path / "a"), "test")
    make_image_folder(str(tmp_path / "b"), splits=("test",), classes=2, per_class=1, size=8)
    make_image_folder(str(tmp_path / "b"), splits=("test",), classes=1, per_class=1, size=6, seed=1)
    (tmp_path / "b" / "test" / "class0" / "0.jpg").rename(tmp_path / "b" / "test" / "class1" / "x.jpg")
    with pytest.raises(data.DataError, match="differ in size"):
        data.load_cifar10(str(tmp_path / "b"), "test")
    (tmp_path / "c" / "test" / "empty").mkdir(parents=True)
    with pytest.raises(data.DataError, match="no images"):
        data.load_cifar10(str(tmp_path / "c"), "test")


def test_a_folder_of_other_images_is_refused_or_described(tmp_path):
    """A folder of grayscale images would be converted to RGB, changing the inputs and their ε-balls without a
    word: refused before any work, naming an image and its mode; a stray grayscale image in a folder of RGB ones
    is converted with a warning naming it. RGB images of another size load, and `describe` says so."""
    from PIL import Image

    make_image_folder(str(tmp_path), splits=("test",), classes=2, per_class=2, size=8)
    assert data.describe(*data.load_cifar10(str(tmp_path), "test")[::2]) == {"channels": 3, "size": [8, 8],
                                                                           "classes": 2}
    Image.new("L", (8, 8), 128).save(tmp_path / "test" / "class1" / "gray.png")  # sorted last in its class
    with pytest.warns(UserWarning, match=r"class1/gray.png is a L image of 8x8 px in a folder of RGB images"):
        images, labels, _ = data.load_cifar10(str(tmp_path), "test")
    assert images.shape == (5, 3, 8, 8)
    for name in ("class0/0.jpg", "class1/0.jpg"):  # now most classes begin with a grayscale image
        Image.new("L", (8, 8), 128).save(tmp_path / "test" / name)
    with pytest.raises(data.DataError, match=r"holds images that are not RGB \(2 of the first images of its 2 "):
        data.load_cifar10(str(tmp_path), "test")


def test_the_imagenet_loader_follows_the_cifar_loaders_rule(tmp_path):
    """One rule (data.rgb, check_rgb_folder) for train_imagenet.py's folders as for train_cifar.py's: a folder of
    grayscale images is refused when the dataset is built, before any work (torchvision's pipeline would have
    converted them without a word); a stray one is converted with a warning."""
    from PIL import Image

    make_image_folder(str(tmp_path), splits=("train",), classes=2, per_class=1, size=8)
    Image.new("L", (8, 8), 128).save(tmp_path / "train" / "class1" / "gray.png")
    folder = data.ImageFolderDataset(str(tmp_path / "train"), data.imagenet_transform(train=True, size=8))
    assert folder[0][0].shape == (3, 8, 8)  # class0/0.jpg: RGB
    with pytest.warns(UserWarning, match=r"class1/gray.png is a L image"):
        assert all(folder[i][0].shape == (3, 8, 8) for i in range(len(folder)))
    for name in ("class0/0.jpg", "class1/0.jpg"):
        Image.new("L", (8, 8), 128).save(tmp_path / "train" / name)
    with pytest.raises(data.DataError, match="holds images that are not RGB"):
        data.ImageFolderDataset(str(tmp_path / "train"), data.imagenet_transform(train=True, size=8))
    with pytest.raises(data.DataError, match="holds images that are not RGB"):
        data.load_folder_images(str(tmp_path / "train"), [0, 1, 2], size=8, workers=0)


def test_torchvision_layout(tmp_path, monkeypatch):
    """torchvision's `cifar-10-batches-py` layout (the one `--download` writes) is read as uint8
    NCHW in CIFAR-10's own order, with its labels and class names. The files are generated in
    torchvision's format; only its MD5 check against the real files is switched off."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
        labels = rng.integers(0, 10, 3).tolist()
        written[name] = pixels, labels
        with open(root / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": labels}, f)
    images, labels, classes = data.load_cifar10(str(tmp_path), "test")
    pixels, expected = written["test_batch"]
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8 and classes == names
    assert data.describe(images, classes) == {"channels": 3, "size": [32, 32], "classes": 10}
    assert labels.tolist() == expected
    assert torch.equal(images, torch.from_numpy(pixels).reshape(3, 3, 32, 32))  # channel c = the c-th 1024 bytes
    train, train_labels, _ = data.load_cifar10(str(tmp_path), "train")
    assert train.shape == (15, 3, 32, 32) and train_labels.tolist() == sum((written[f"data_batch_{i}"][1]
                                                                             for i in range(1, 6)), [])
