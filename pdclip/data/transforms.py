"""Image transforms shared by every source: uint8 image -> CLIP-normalised float tensor.

Sources hand over a `uint8` tensor `(3, H, W)` or a PIL image. Training adds light augmentation
only: a random shift by up to 1/16 of the side (edges replicated). No horizontal flip and no large
crops, because synthetic captions state positions and relations ("a red circle to the left of a blue
square") that a flip would make false.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import functional as TF

# CLIP's normalisation, equal to open_clip.constants.OPENAI_DATASET_MEAN / _STD (tested); copied so
# that importing the data package does not pay open_clip's 4 s import.
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


class ImageTransform:
    """uint8 `(3, H, W)` tensor or PIL image -> float `(3, S, S)` normalised with CLIP's mean and std.

    Plain tensor operations rather than a `v2.Compose` with a random resized crop: at 32-64 px that
    pipeline cost more than rendering a synthetic scene (benchmarks/data_throughput.py).
    """

    def __init__(self, image_size: int, train: bool) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.size, self.train = image_size, train
        self.pad = max(1, image_size // 16)

    def __call__(self, image: Tensor | Image.Image) -> Tensor:
        pixels = TF.pil_to_tensor(image.convert("RGB")) if isinstance(image, Image.Image) else image
        if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] != 3:
            raise ValueError(f"expected a uint8 (3, H, W) image, got {pixels.dtype} {tuple(pixels.shape)}")
        if pixels.shape[1:] != (self.size, self.size):  # shorter side to size, then the centre
            pixels = TF.center_crop(TF.resize(pixels, self.size, antialias=True), [self.size, self.size])
        image = (pixels.float() / 255 - MEAN) / STD
        if self.train:  # torch's global RNG: the trainer seeds it per sample
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            padded = F.pad(image[None], (self.pad,) * 4, mode="replicate")[0]
            image = padded[:, top:top + self.size, left:left + self.size]
        return image


def image_transform(image_size: int, train: bool) -> ImageTransform:
    """The transform of one split: `train` adds a random shift by up to `image_size // 16` pixels.

    Returns:
        A callable mapping a `uint8` tensor `(3, H, W)` or a PIL image to a float tensor
        `(3, image_size, image_size)` normalised with CLIP's mean and std.
    """
    return ImageTransform(image_size, train)


def split_transform(image_size: int, split: str, augment: bool | None = None) -> ImageTransform:
    """The transform of a dataset split: augmented for "train" only, unless `augment` says otherwise
    (`augment=False` gives frozen features of the training split, e.g. for a linear probe)."""
    return image_transform(image_size, train=split == "train" if augment is None else augment)


def to_uint8(image: Tensor) -> Tensor:
    """Undo the normalisation: float `(3, H, W)` from `image_transform` -> `uint8 (3, H, W)`.

    Lets `write_shards` turn any source's samples back into image files.
    """
    return (image * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)
