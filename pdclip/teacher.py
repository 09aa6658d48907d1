"""Teachers: frozen copies of the student that KD, OTTER and PSD read their targets from (docs/methods.md §4, §5).

`EmaTeacher` averages the student's parameters (OTTER's teacher, and PSD's `psd_teacher="ema"`);
`SnapshotTeacher` copies them every N steps (PSD's `psd_teacher="snapshot"`, after PS-KD's "model of
the previous epoch"). Both offer what the training loop uses: `module` (the frozen copy, whose forward
is the teacher's one extra pass), `update(model)` once per step *before* the student's forward, and
`state_dict` / `load_state_dict`, so a resumed run continues exactly. `make_teacher` picks one from a
`LossConfig`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pdclip.config import LossConfig
from pdclip.models import frozen_backbones

# Where pdclip's towers keep their tokenizers: `DualEncoder.tokenizer`, `SentenceEncoderText.hf_tokenizer`.
TOKENIZER_ATTRS = ("tokenizer", "hf_tokenizer")


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` without gradients that *shares* the student's frozen parameters.

    Frozen parameters (`requires_grad=False`, e.g. a frozen pretrained text tower) never change, so the
    teacher shares them with the student instead of holding a copy: on Binder's ~1.5 GB that matters.
    Tokenizers hold no learned state either, and copying open_clip's BPE tables made the copy of a
    `tutorial_cpu` model 7x slower (0.15 s against 0.02 s, measured 2026-12-03): they are shared too.
    """
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    for module in model.modules():
        for name in TOKENIZER_ATTRS:
            tokenizer = getattr(module, name, None)
            if tokenizer is not None and not isinstance(tokenizer, nn.Module):
                shared[id(tokenizer)] = tokenizer
    return copy.deepcopy(model, memo=shared).eval().requires_grad_(False)


@torch.no_grad()
def move_towards(teacher: nn.Module, student: nn.Module, weight: float) -> None:
    """`θ_t ← θ_t + w (θ_s − θ_t)` for every parameter (`w = 1` copies exactly); buffers are copied.

    One `_foreach` call per list instead of a Python loop: on a GPU that is a few fused kernels instead
    of one launch per tensor; on a CPU the update is bound by memory either way (the heads' or the
    token embedding's size), and the loop's overhead goes.
    """
    # Shared frozen parameters are the same tensor in both: already equal, nothing to do.
    pairs = [(p_t, p) for p_t, p in zip(teacher.parameters(), student.parameters(), strict=True) if p_t is not p]
    if pairs:
        ours, theirs = (list(side) for side in zip(*pairs, strict=True))
        if weight == 1.0:
            torch._foreach_copy_(ours, theirs)
        else:
            torch._foreach_lerp_(ours, theirs, weight)
    buffers = list(zip(teacher.buffers(), student.buffers(), strict=True))
    if buffers:
        torch._foreach_copy_(*(list(side) for side in zip(*buffers, strict=True)))


class FrozenCopyTeacher:
    """What both teachers share: the frozen copy of the student, an update counter, and a state that
    leaves out the frozen backbones the copy shares with the student (the student's checkpoint holds
    their hash; they are rebuilt from their packages, `pdclip.models.trainable_state`)."""

    def __init__(self, model: nn.Module):
        self.module = frozen_copy(model)
        self.shared = tuple(frozen_backbones(model))  # state-dict prefixes whose tensors are the student's
        self.num_updates = 0

    def module_state(self) -> dict:
        return {k: v for k, v in self.module.state_dict().items() if not k.startswith(self.shared)}

    def load_module_state(self, state: dict) -> None:
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(self.shared)]
        if missing or unexpected:
            raise ValueError(f"teacher state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


class EmaTeacher(FrozenCopyTeacher):
    """An exponential moving average of the student's parameters.

    Decay warms up as in OTTER's code, `d_n = min(decay, (1 + n) / (10 + n))`, so the teacher tracks the
    student closely at first instead of anchoring to the random initialisation. Only parameters are
    averaged; buffers (e.g. BatchNorm statistics) are copied. Call `update` every step *before* the
    student's forward. Under DDP pass the unwrapped module (`ddp_model.module`).
    """

    def __init__(self, model: nn.Module, decay: float = LossConfig.ema_decay):
        super().__init__(model)
        self.decay = decay

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def update(self, model: nn.Module) -> None:
        move_towards(self.module, model, 1.0 - self.current_decay())
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module_state(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.load_module_state(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])


class SnapshotTeacher(FrozenCopyTeacher):
    """The student as it was at the last refresh; refreshed every `every` steps.

    PS-KD's teacher (Kim et al., ICCV 2021) is the model of the previous epoch; this is that teacher
    with the period counted in steps. `update` (called every step before the student's forward) copies
    the student on calls 0, N, 2N, …, so at step k the teacher is the student of step `k - k mod N`:
    it *equals* the student on a refresh step (as PS-KD's does on an epoch's first step) and lags by
    up to N - 1 steps in between. It costs what the EMA teacher costs: one frozen copy and its forward.
    """

    def __init__(self, model: nn.Module, every: int):
        if every < 1:
            raise ValueError(f"the snapshot teacher's refresh period (psd_snapshot_every) must be >= 1, got {every}")
        super().__init__(model)
        self.every = every

    def update(self, model: nn.Module) -> None:
        if self.num_updates % self.every == 0:
            move_towards(self.module, model, 1.0)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module_state(), "num_updates": self.num_updates, "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        self.load_module_state(state["module"])
        self.num_updates = int(state["num_updates"])
        self.every = int(state["every"])


def make_teacher(model: nn.Module, cfg: LossConfig) -> EmaTeacher | SnapshotTeacher | None:
    """The teacher network `cfg` reads (`cfg.teacher_model`), or None when it needs none."""
    if cfg.teacher_model == "ema":
        return EmaTeacher(model, cfg.ema_decay)
    if cfg.teacher_model == "snapshot":
        return SnapshotTeacher(model, cfg.psd_snapshot_every)
    return None
