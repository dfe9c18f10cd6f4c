"""Data for llr: CIFAR-10 held in memory and augmented on the device in batches;
ImageNet read from its folders by DataLoader workers.

Two layouts are read for CIFAR-10 (`--data-dir`):
- torchvision's (`cifar-10-batches-py/`), downloaded there once on request;
- an ImageFolder tree `train/<class>/*` and `test/<class>/*` of images, e.g. the JPEG
  copy in `../shared/data` (`mkdir -p data/cifar10-jpeg && tar xzf cifar10-jpeg.tar.gz -C data/cifar10-jpeg`).
Folder trees are sorted by class, so their images are put in one fixed random
order (seed 0) when loaded: "the first N test images" are then a mix of classes,
as in CIFAR-10's own test order.
"""
import os
import warnings

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPEG")


class DataError(Exception):
    """A missing or malformed dataset; the message says how to get it right."""


CIFAR10_HELP = ("download it with `python train_cifar.py --download --data-dir DIR` (needs the network), or point "
                "--data-dir (make: DATA_DIR=...) to an ImageFolder tree with train/ and test/ "
                "(e.g. the JPEG copy: mkdir -p data/cifar10-jpeg && tar xzf cifar10-jpeg.tar.gz -C data/cifar10-jpeg)")


def cifar10_class_count(data_dir):
    """The number of classes of the CIFAR-10 at data_dir without reading it: an ImageFolder tree's
    class folders in train/, else torchvision's 10."""
    train = os.path.join(data_dir, "train")
    if os.path.isdir(train):
        return len([d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d))]) or None
    return 10


def load_cifar10(data_dir, split, download=False):
    """CIFAR-10's `split` ("train" or "test") as (uint8 images [N, 3, H, W], int64 labels [N], class names):
    32 x 32 for CIFAR-10; an ImageFolder tree of RGB images of another size is read at its size (`describe`)."""
    if os.path.isdir(os.path.join(data_dir, "train")) or os.path.isdir(os.path.join(data_dir, "test")):
        folders = [os.path.join(data_dir, s) for s in ("train", "test") if os.path.isdir(os.path.join(data_dir, s))]
        class_lists = {f: sorted(d for d in os.listdir(f) if os.path.isdir(os.path.join(f, d))) for f in folders}
        if len({tuple(c) for c in class_lists.values()}) > 1:
            raise DataError(f"train/ and test/ in {data_dir} hold different class folders "
                            f"({' vs '.join(str(c) for c in class_lists.values())}): labels would not match")
        return load_image_folder(os.path.join(data_dir, split))
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(data_dir, train=split == "train", download=download)
    except RuntimeError as e:  # "Dataset not found or corrupted"
        raise DataError(f"no CIFAR-10 at {data_dir!r} ({e}); {CIFAR10_HELP}") from None
    except OSError as e:  # the download failed
        raise DataError(f"could not download CIFAR-10 into {data_dir!r} ({e}); {CIFAR10_HELP}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets), list(ds.classes)


def load_image_folder(folder):
    """Every image of an ImageFolder tree `folder/<class>/*`, RGB (`rgb`'s rule) and of one size, in a fixed
    random order (seed 0). Returns (uint8 images [N, 3, H, W], labels [N], class names)."""
    import numpy as np
    from PIL import Image

    files, labels, classes = _list_image_folder(folder)
    check_rgb_folder(folder, files, classes)
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(rgb(image, path)))
        except OSError as e:  # includes PIL's UnidentifiedImageError
            raise DataError(f"cannot decode {path} ({e})") from None
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise DataError(f"images in {folder} differ in size ({sorted(sizes)[:3]} ...); this loader needs one size")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return images[order], torch.tensor(labels)[order], classes


def rgb(image, path):
    """The rule of every loader here (train_cifar.py's folders, train_imagenet.py's, eval.py's), with
    `check_rgb_folder`: the images are RGB. A folder of images in another mode (grayscale, CMYK, palette,
    RGBA) is refused before any work: converting it would change the inputs, and their ε-balls, without a
    word. A stray image of another mode in a folder of RGB ones is converted to RGB with a warning naming
    it (ILSVRC-2012's training set holds a few CMYK and grayscale JPEGs; torchvision's loader converts them
    silently). Returns the RGB image."""
    if image.mode == "RGB":
        return image
    warnings.warn(f"{path} is a {image.mode} image of {image.size[0]}x{image.size[1]} px in a folder of RGB "
                  f"images: converted to RGB", stacklevel=2)
    return image.convert("RGB")


def check_rgb_folder(folder, files, classes):
    """Before any work: DataError (one line) when most of the first image of each class are not RGB, a folder
    of grayscale or other images (`rgb`'s rule); reads only the images' headers."""
    from PIL import Image

    firsts = {}
    for path in files:  # sorted by class: the first file of each class directory
        firsts.setdefault(os.path.dirname(path), path)
    modes = {}
    for path in firsts.values():
        try:
            with Image.open(path) as image:
                modes[path] = image.mode
        except OSError as e:
            raise DataError(f"cannot decode {path} ({e})") from None
    other = [p for p, mode in modes.items() if mode != "RGB"]
    if 2 * len(other) > len(modes):
        raise DataError(f"{folder} holds images that are not RGB ({len(other)} of the first images of its "
                        f"{len(classes)} classes, e.g. {other[0]}: {modes[other[0]]}); converting them would change "
                        f"the inputs and their ε-balls without a word, so convert the folder first if that is what "
                        f"you mean")


def describe(images, classes):
    """What a loaded image set is, for a run's header and JSON: {"channels": C, "size": [H, W], "classes": K}
    (CIFAR-10: 3, [32, 32], 10; an ImageFolder tree of RGB images of another size loads at its size)."""
    return {"channels": images.shape[1], "size": list(images.shape[2:]), "classes": len(classes)}


def _list_image_folder(folder):
    """(files, labels, classes) of an ImageFolder tree, sorted, with one-line errors."""
    if not os.path.isdir(folder):
        raise DataError(f"no folder {folder!r}; expected an ImageFolder tree {folder}/<class>/<image>")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, name))):
            if f.endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(folder, name, f))
                labels.append(label)
    if not files:
        raise DataError(f"no images in {folder!r}; expected {folder}/<class>/<image>.jpg|png")
    return files, labels, classes


def holdout_split(n, holdout_n):
    """(training indices, held-out indices) of a training set of n samples: `holdout_n` samples held
    out for model selection, the same for every run and seed (a fixed permutation, seed 0), in that
    permutation's order (so the first k are a random mix of classes); the rest, sorted, for training."""
    if not 0 <= holdout_n < n:
        raise DataError(f"cannot hold out {holdout_n} of the {n} training images for validation "
                        f"(--val-n must lie in [0, {n - 1}])")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[holdout_n:].sort().values, order[:holdout_n]


def balanced_subset(labels, indices, n):
    """The first n // K of each of the K classes among `indices` (in their order): a fixed,
    class-balanced subset of n training images."""
    classes = labels.unique()
    if n % len(classes) or n > len(indices):
        raise DataError(f"--train-n {n} must be a multiple of the {len(classes)} classes and at most the "
                        f"{len(indices)} training images")
    per_class = n // len(classes)
    chosen = [indices[labels[indices] == c][:per_class] for c in classes]
    if any(len(c) < per_class for c in chosen):
        raise DataError(f"--train-n {n}: some class has fewer than {per_class} training images")
    return torch.cat(chosen).sort().values


def indices_digest(indices):
    """A short fingerprint (sha256, 16 hex digits) of a list of sample indices, for checkpoint metadata."""
    import hashlib

    return hashlib.sha256(torch.as_tensor(indices, dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


PAD_MODES = {"reflect": "reflect", "zeros": "constant"}  # crop_and_flip's mode -> F.pad's


def crop_and_flip(images, padding=4, generator=None, mode="reflect"):
    """Standard CIFAR augmentation on the device for a batch [B, C, H, W]: pad by `padding`, take
    a random H x W crop, flip half the batch. mode "reflect": mirror the border (the LLR authors'
    `datasets.py`); "zeros": black pixels (torchvision's RandomCrop(32, padding=4), as GradAlign's
    data.py, fast_adversarial, N-FGSM and ELLE)."""
    if mode not in PAD_MODES:
        raise ValueError(f"unknown padding mode {mode!r}; choose from {', '.join(PAD_MODES)}")
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4, mode=PAD_MODES[mode])
    top = torch.randint(0, 2 * padding + 1, (b, 1, 1), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (b, 1, 1), generator=generator, device=device)
    rows = (top + torch.arange(h, device=device).view(1, h, 1)).expand(b, h, w)  # [B, H, W]
    cols = (left + torch.arange(w, device=device).view(1, 1, w)).expand(b, h, w)
    flip = torch.rand(b, 1, 1, generator=generator, device=device) < 0.5
    cols = torch.where(flip, left + (w - 1) - (cols - left), cols)  # mirror inside the crop
    flat = (rows * (w + 2 * padding) + cols).view(b, 1, h * w).expand(-1, images.shape[1], -1)
    return padded.flatten(2).gather(2, flat).view_as(images)


def imagenet_transform(train, size=224):
    """torchvision's standard ImageNet pipeline to uint8 tensors: random-resized crop and flip for
    training; resize to 256/224 of `size` and a center crop for evaluation."""
    from torchvision.transforms import v2

    if train:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(size * 256 // 224, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.ToImage(), *steps])  # RGB only: ImageFolderDataset's images pass `rgb`


class ImageFolderDataset(torch.utils.data.Dataset):
    """An ImageFolder tree as (uint8 image [3, H, W], label) pairs, read and transformed on access; a folder
    of images that are not RGB is refused, a stray one converted with a warning (`rgb`)."""

    def __init__(self, folder, transform):
        self.files, self.labels, self.classes = _list_image_folder(folder)
        check_rgb_folder(folder, self.files, self.classes)
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as image:
            return self.transform(rgb(image, self.files[i])), self.labels[i]


def load_folder_subset(folder, n, size=224, workers=8):
    """The first n images of an ImageFolder tree in a fixed random order (seed 0; the tree is sorted
    by class), resized and center-cropped as for evaluation: (uint8 [n, 3, size, size], labels [n])."""
    count = len(_list_image_folder(folder)[0])
    return load_folder_images(folder, torch.randperm(count, generator=torch.Generator().manual_seed(0))[:n], size,
                              workers)


def load_folder_images(folder, indices, size=224, workers=8):
    """The images of an ImageFolder tree at `indices` (of its sorted file list), resized and
    center-cropped as for evaluation: (uint8 [n, 3, size, size], labels [n])."""
    dataset = ImageFolderDataset(folder, imagenet_transform(train=False, size=size))
    if len(indices) == 0:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, torch.as_tensor(indices).tolist()),
                                         batch_size=64, num_workers=min(workers, os.cpu_count() or 1))
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)
