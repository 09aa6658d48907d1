"""The EMA teacher used by KD and OTTER (and PSD's `psd_teacher="ema"` ablation), methods.md §4."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EmaTeacher:
    """An exponential moving average of the student's parameters.

    Decay warms up as in OTTER's code, `d_n = min(decay, (1 + n) / (10 + n))`, so the teacher tracks the
    student closely at first instead of anchoring to the random initialisation. Only parameters are
    averaged; buffers (e.g. BatchNorm statistics) are copied. Call `update` every step *before* the
    student's forward. Under DDP pass the unwrapped module (`ddp_model.module`).

    Frozen parameters (`requires_grad=False`, e.g. a frozen pretrained text tower) never change, so the
    teacher shares them with the student instead of holding a copy: on Binder's ~1.5 GB that matters.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for p_t, p in zip(self.module.parameters(), model.parameters(), strict=True):
            if p_t is not p:  # shared frozen parameters are already equal
                p_t.lerp_(p.detach().to(p_t.dtype), 1.0 - d)
        for b_t, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_t.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
