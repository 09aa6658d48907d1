"""A pdclip checkpoint as an open_clip `local-dir:` model, for open_clip and CLIP_benchmark.

    python -m pdclip.export --checkpoint runs/psd --out exported/psd
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported/psd')"

`DIR` gets `open_clip_config.json` (`model_cfg`: the architecture; `preprocess_cfg`: image size, mean,
std) and `open_clip_pytorch_model.bin` (the weights; open_clip's `local-dir:` loader looks for these
names). The student's embeddings are kept exactly (to float round-off); OTTER's second temperature
(`logit_scale_soft`) has no place in open_clip and is left out.

- From-scratch towers (pdclip/model_configs/*.json and open_clip's architectures) are open_clip's own:
  their config and weights go over unchanged.
- The offline EfficientNet-Lite image tower becomes open_clip's timm tower (`timm_model_name`, no
  download: the weights are in the file). Its inputs are normalised with mean = std = 0.5, which
  the tower's preprocessing says, instead of pdclip's CLIP normalisation and rescaling.
- The MiniLM text tower with a linear head becomes open_clip's HF text tower (mean pooling, linear
  projection). Its HF config and tokenizer are written into `DIR` and `hf_model_name` is `DIR`'s
  absolute path, so nothing downloads: move `DIR` and re-export (or edit that path).
Other heads cannot be expressed (`NotExportable` says which and why).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import open_clip
import torch
from open_clip.hf_configs import arch_dict
from torch import Tensor, nn

from pdclip.checkpoint import load_checkpoint
from pdclip.config import TrainConfig
from pdclip.data.transforms import MEAN, STD
from pdclip.models import DualEncoder, register_model_configs
from pdclip.text_tower import SentenceEncoderText
from pdclip.towers import BACKBONE_MEAN, BACKBONE_STD, PretrainedImageTower, tower_spec

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_pytorch_model.bin"  # what local-dir: reads
__all__ = ["export", "NotExportable", "main"]


class NotExportable(ValueError):
    """The model has a part that open_clip's towers cannot express."""


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the student of `checkpoint` (a run folder or checkpoint file) as an open_clip model in `out`.

    Returns:
        `out`, loadable with `open_clip.create_model_and_transforms(f"local-dir:{out}")`.

    Raises:
        NotExportable: a tower that open_clip cannot express (checked before anything is written).
    """
    model, cfg = load_checkpoint(checkpoint)
    out = Path(out)
    register_model_configs()
    model_cfg = copy.deepcopy(open_clip.get_model_config(cfg.model))
    model_cfg["custom_text"] = True  # pdclip builds its towers with force_custom_text: `text.*` names
    if cfg.embed_dim is not None:
        model_cfg["embed_dim"] = cfg.embed_dim
    vision, visual_state, mean, std = image_tower(model, cfg, model_cfg["vision_cfg"])
    text, text_state = text_tower(model.text, model_cfg["text_cfg"], out)
    model_cfg.update(vision_cfg=vision, text_cfg=text)
    state = {**visual_state, **text_state, "logit_scale": model.logit_scale.detach().clone()}
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model.text, SentenceEncoderText):  # the HF tower's config and tokenizer, read from `out`
        model.text.backbone.transformer.config.save_pretrained(out)
        model.text.hf_tokenizer.save_pretrained(out)
    preprocess = {"size": model.image_size, "mean": list(mean), "std": list(std)}
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    torch.save(state, out / WEIGHTS_FILE)
    return out


def image_tower(model: DualEncoder, cfg: TrainConfig, vision_cfg: dict) -> tuple[dict, dict[str, Tensor], tuple, tuple]:
    """open_clip's `vision_cfg`, the `visual.*` weights and the input normalisation (mean, std) of the tower."""
    size = model.image_size
    if not isinstance(model.visual, PretrainedImageTower):  # open_clip's own tower
        return {**vision_cfg, "image_size": size}, prefixed(model.visual, "visual."), rgb(MEAN), rgb(STD)
    backbone, head = model.visual.backbone, model.visual.head
    embed_dim = cfg.embed_dim or open_clip.get_model_config(cfg.model)["embed_dim"]
    trunk = {f"visual.trunk.{k}": v for k, v in backbone.net.state_dict().items() if not k.startswith("classifier.")}
    if isinstance(head, nn.Linear):
        proj, proj_bias, names = "linear", False, {"weight": "proj.weight"}
    elif head[0].out_features == 2 * embed_dim:  # timm's Mlp: fc1 -> GELU -> fc2, hidden 2 x embed_dim
        proj, proj_bias, names = "mlp", True, {f"{i}.{p}": f"mlp.fc{n}.{p}" for i, n in ((0, 1), (2, 2))
                                                for p in ("weight", "bias")}
    else:
        raise NotExportable(f"open_clip's timm tower has an MLP head of width 2 x embed_dim = {2 * embed_dim}, "
                            f"this one is {head[0].out_features} wide: train with --head_hidden {2 * embed_dim} "
                            "or --head linear to export")
    heads = {f"visual.head.{names[k]}": v for k, v in head.state_dict().items()}
    timm = {"timm_model_name": tower_spec(backbone.name).arch, "timm_model_pretrained": False, "timm_pool": "avg",
            "timm_proj": proj, "timm_proj_bias": proj_bias, "image_size": size}
    # The backbone rescales CLIP-normalised pixels to [-1, 1]; open_clip's preprocessing does it directly.
    return timm, {**trunk, **heads}, (BACKBONE_MEAN,) * 3, (BACKBONE_STD,) * 3


def text_tower(text: nn.Module, text_cfg: dict, out: Path) -> tuple[dict, dict[str, Tensor]]:
    """open_clip's `text_cfg` and the `text.*` weights of the tower (an HF tower reads `out`)."""
    if not isinstance(text, SentenceEncoderText):  # open_clip's own text transformer
        return text_cfg, prefixed(text, "text.")
    if not isinstance(text.head, nn.Linear) or text.head.bias is not None:
        raise NotExportable("open_clip's HF text towers project linearly or with a bias-free MLP of their own "
                            "width; this text head is an MLP with biases: train with --head linear to export")
    kind = text.backbone.transformer.config.model_type
    if kind not in arch_dict:
        raise NotExportable(f"open_clip's HF text towers know the architectures {sorted(arch_dict)}, not {kind!r}")
    directory = str(out.resolve())
    hf = {"hf_model_name": directory, "hf_tokenizer_name": directory, "hf_model_pretrained": False,
          "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": text.context_length}
    # open_clip's mean-pooled tower builds the transformer without BERT's pooler, which pdclip never reads.
    state = {f"text.transformer.{k}": v for k, v in text.backbone.transformer.state_dict().items()
             if not k.startswith("pooler.")}
    return hf, {**state, "text.proj.weight": text.head.weight.detach().clone()}


def prefixed(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


def rgb(values: Tensor) -> tuple[float, ...]:
    """A `(3, 1, 1)` normalisation tensor as open_clip's `(r, g, b)` floats."""
    return tuple(float(v) for v in values.flatten())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m pdclip.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder or checkpoint file")
    parser.add_argument("--out", required=True, help="the folder to write (open_clip's local-dir: model)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (NotExportable, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: open_clip.create_model_and_transforms('local-dir:{out}')")
    return out


if __name__ == "__main__":
    main()
