"""Configuration as plain data: the only home of defaults.

`LossConfig` holds every knob of the soft-target methods (docs/methods.md §1-5). The training
configuration (`TrainConfig`) embeds it, so a checkpoint's `to_dict()` records the targets too.
The command line that fills them (`--field=value`, `--help` built from the comments here) is
`pdclip.cli`, which imports this module, never the reverse.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

# The values a choice field takes: checked in `__post_init__` (`CHOICES`) and listed by `--help`.
METHODS = ("clip", "ls", "kd", "psd", "otter")
PSD_SCHEDULES = ("linear", "constant", "cosine")
PSD_TEACHERS = ("self", "ema", "snapshot", "intra")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HEADS = ("linear", "mlp")
REPORTERS = ("tensorboard",)  # TrainConfig.report_to, beside the always-written metrics.jsonl
CHOICES = {"method": METHODS, "psd_schedule": PSD_SCHEDULES, "psd_teacher": PSD_TEACHERS,
           "optimizer": OPTIMIZERS, "precision": PRECISIONS, "head": HEADS, "report_to": REPORTERS}
CONFIG_DIR = Path(__file__).parent / "configs"  # shipped TrainConfig files


@dataclass
class LossConfig:
    """Hyper-parameters of the target makers. Paper values unless marked *reconstruction*."""

    method: str = "clip"  # which targets + loss (pdclip.methods); "clip" is the identity-target baseline
    # Label smoothing (docs/methods.md §2): the OTTER paper does not state its value.
    ls_epsilon: float = 0.1
    # KD and OTTER mix the hard and soft losses: L = alpha * L_clip + (1 - alpha) * L_soft (§3, §4).
    mix_alpha: float = 0.5
    kd_tau: float = 100.0  # KD's sharpness: the teacher's similarities x kd_tau before the softmax (§3)
    # OTTER (§4): Sinkhorn on the teacher's similarities, positive pair masked by a large lambda.
    ot_epsilon: float = 0.15
    ot_iters: int = 5  # Sinkhorn iterations
    ot_lambda: float = 100.0  # the penalty that masks the positive pair in the cost
    # EMA teacher for KD / OTTER (and PSD's psd_teacher="ema"): d_n = min(decay, (1 + n) / (10 + n)).
    ema_decay: float = 0.999
    # PSD (§5) — a *reconstruction*: every open choice is a field.
    psd_alpha_max: float = 0.5  # the soft targets' weight alpha at the end of psd_schedule
    psd_subset: float = 0.5  # rho: fraction of rows that receive soft targets
    psd_schedule: str = "linear"  # how alpha rises from 0 to psd_alpha_max over the run (pdclip.schedules)
    psd_temperature: float = 1.0  # T_soft: the teacher's logits, at the teacher's own temperature, / T_soft
    # Whose predictions become the soft targets (pdclip.methods.psd_teacher_logits):
    #   "self": the same forward, detached — at T_soft = 1 only a per-row reweighting of CLIP (a control);
    #   "ema": an EMA of the student, at its own temperature (one extra teacher forward);
    #   "snapshot": the student of up to psd_snapshot_every steps ago, refreshed on that schedule
    #     (PS-KD's previous-epoch teacher; one extra teacher forward);
    #   "intra": image–image and text–text similarities of the same forward (as KD / OTTER read them).
    # The default was chosen on validation data, in the study's PSD ablation (docs/methods.md §5).
    psd_teacher: str = "ema"
    psd_snapshot_every: int = 50  # steps between refreshes of the "snapshot" teacher (PS-KD: one epoch)

    # Multi-positive base (docs/methods.md §8, pdclip.positives): a caption identical to pair i's own is
    # also right for image i; every method's hard targets (and the soft mass mixed into them) use it.
    multi_positive: bool = False
    positive_images: bool = False  # with multi_positive: identical images (same bytes) count too
    # The losses' speed paths (pdclip.fast: transposed copies, PSD's closed-form gradient): the same values
    # and gradients as the plain definitions the notebooks teach (tested), cheaper on a CPU at large B.
    fast_loss: bool = False

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("ls_epsilon", "mix_alpha", "psd_alpha_max", "psd_subset"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("kd_tau", "ot_epsilon", "psd_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ot_iters", "psd_snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.positive_images and not self.multi_positive:
            raise ValueError("positive_images=True needs multi_positive=True")

    @property
    def teacher_model(self) -> str | None:
        """The separate teacher network the method reads (`pdclip.teacher.make_teacher`): "ema",
        "snapshot", or None — PSD's "self" and "intra" teachers read the student's own forward."""
        if self.method in ("kd", "otter"):
            return "ema"
        if self.method == "psd" and self.psd_teacher in ("ema", "snapshot"):
            return self.psd_teacher
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LossConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LossConfig field(s): {sorted(unknown)}")
        return cls(**d)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_choices(cfg: LossConfig | TrainConfig) -> None:
    """`check_choice` for each of `cfg`'s fields listed in `CHOICES` (None: an optional one left unset)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in CHOICES and value is not None:
            check_choice(f.name, value, CHOICES[f.name])


@dataclass
class TrainConfig:
    """Everything `pdclip.train.fit` needs. Nested `loss` holds the method and its knobs.

    On the command line every field (and every `LossConfig` field, e.g. `--method`) is an option
    `--field=value`; `with_overrides` checks the names and types.
    """

    # Data: a `pdclip.data` source; `data_kwargs` go to `build_dataset` (e.g. `n_train`, `root`, `urls`).
    dataset: str = "synthetic"  # a pdclip.data source (pdclip.data.SOURCES), built by build_dataset
    data_kwargs: dict = field(default_factory=dict)  # JSON keywords of the source, e.g. '{"n_train": 2000}'
    train_data: str | None = None  # shards / hf: the training shards, a brace pattern (replaces data_kwargs' urls)
    val_data: str | None = None  # shards / hf: held-out shards for evaluation; without them none runs
    # Model (pdclip.models.create_model); OTTER initialises both log-temperatures at 3.9.
    model: str = "pdclip-vit-tiny"  # an open_clip architecture (pdclip/model_configs/*.json or open_clip's)
    pretrained_text: str | None = None  # e.g. "all-MiniLM-L6-v2": an offline sentence encoder (pdclip[text])
    freeze_text: bool = False  # with pretrained_text: train only its new head (and trainable_text_layers)
    trainable_text_layers: int = 0  # with freeze_text: its last transformer layers that still train
    pretrained_image: str | None = None  # e.g. "efficientnet_lite0": offline ImageNet weights (pdclip.towers)
    freeze_image: bool = False  # fix the pretrained image tower but trainable_blocks (+ an offline one's head); open_clip's --lock-image
    trainable_blocks: int = 0  # with freeze_image: its last blocks (open_clip towers: layer groups) that still train
    pretrained_lr_scale: float = 0.1  # lr multiplier of the trainable pretrained weights (image blocks, text layers)
    image_size: int | None = None  # None: the offline backbone's ImageNet size, else the architecture's
    head: str = "linear"  # the pretrained towers' new projection heads: "linear" | "mlp"
    head_hidden: int = 512  # the "mlp" head's hidden width
    embed_dim: int | None = None  # the shared dimension D; None keeps the architecture's
    # Feature cache (pdclip.features): both pretrained towers frozen, their frozen trunks run once per image
    # and caption (outputs on disk), then only the heads and the trainable blocks / text layers train.
    # No augmentation unless feature_views > 1.
    feature_cache: bool = False
    feature_views: int = 1  # image views of the training split: 0 plain, 1.. augmented; epoch e reads e % K
    feature_cache_dir: str | None = None  # None: $PDCLIP_FEATURE_CACHE, else a checkout's .cache/features (pdclip.runtime.cache_dir)
    init_logit_scale: float = math.log(1 / 0.07)  # the log-temperature at init (open_clip: log(1/0.07))
    init_logit_scale_soft: float = 3.9  # OTTER's second log-temperature (its soft targets') at init
    # Optimisation. `batch_size` is the *global* batch, split evenly over the ranks.
    steps: int = 300  # optimiser updates
    batch_size: int = 64  # pairs per update, over all ranks
    accum_freq: int = 1  # split each update's batch into this many micro-batches (less memory, same update)
    optimizer: str = "adamw"  # "adamw" | "sgd" (OTTER's recipe: momentum 0.9, lr 3e-3, wd 0, no warm-up)
    lr: float = 1e-3  # peak learning rate: linear warm-up to it, then cosine decay to min_lr
    min_lr: float = 0.0  # the learning rate at the last step
    warmup_steps: int = 30  # steps of linear warm-up from 0
    weight_decay: float = 0.1  # decoupled weight decay (none on gains, biases and temperatures)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's betas, a JSON list: '[0.9, 0.98]'
    eps: float = 1e-6  # AdamW's epsilon
    momentum: float = 0.9  # SGD's momentum
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    precision: str = "auto"  # "auto" (bf16 / fp16 on a GPU, fp32 on a CPU) | "fp32" | "bf16" | "fp16"
    device: str = "auto"  # "auto" (the GPU of LOCAL_RANK if one is visible, else the CPU) | "cpu" | "cuda[:N]"
    num_workers: int = 0  # DataLoader worker processes per rank; 0 loads in the training process
    seed: int = 0  # seeds the initialisation, the batch order and PSD's subsets
    # Outputs: <out>/metrics.jsonl, eval.jsonl, train.log, config.json, checkpoint_XXXXXX.pt (every save_every
    # steps, the newest keep_checkpoints kept), checkpoint.pt (the newest of them), snapshots/step_XXXXXX.pt.
    out: str = "runs/default"  # the run folder
    resume: str | None = None  # "latest" (the newest checkpoint in out) or a checkpoint file; true = "latest"
    overwrite: bool = False  # start again in an out that holds a run (its checkpoints and logs are deleted)
    keep_checkpoints: int = 3  # the newest numbered checkpoints kept; 0 keeps them all
    report_to: str | None = None  # also log metrics to "tensorboard" (<out>/tensorboard; pip install pdclip[tensorboard])
    save_every: int = 100  # steps between checkpoints (one is always written at the end)
    eval_every: int = 0  # steps between evaluations; 0 evaluates only at the end when an eval hook exists
    eval_steps: tuple[int, ...] = ()  # more steps to evaluate at, a JSON list: '[10, 20, 50]' (early stopping)
    snapshot_every: int = 50  # steps between snapshots of the probe batch; 0 turns them off
    snapshot_size: int = 32  # pairs in the fixed probe batch
    eval_max_samples: int = 500  # per split in the CLI's periodic evaluation (val split, no linear probe)
    progress: bool = True  # a progress bar on rank 0
    loss: LossConfig = field(default_factory=LossConfig)  # the method and its knobs: --FIELD or --loss.FIELD

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig.from_dict(self.loss)
        self.betas = tuple(self.betas)
        self.eval_steps = tuple(sorted(set(self.eval_steps)))
        if any(s < 1 for s in self.eval_steps):
            raise ValueError(f"eval_steps must be steps >= 1, got {list(self.eval_steps)}")
        check_choices(self)
        for name in ("steps", "batch_size", "accum_freq", "snapshot_size", "eval_max_samples", "head_hidden",
                     "feature_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "num_workers",
                     "save_every", "eval_every", "snapshot_every", "trainable_blocks", "trainable_text_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("image_size", "embed_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        if self.batch_size % self.accum_freq:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of accum_freq ({self.accum_freq}): "
                             "it is the whole update's batch, split into accum_freq micro-batches")
        if not 0.0 < self.pretrained_lr_scale <= 1.0:
            raise ValueError(f"pretrained_lr_scale must be in (0, 1], got {self.pretrained_lr_scale}")
        shard_source = self.dataset in ("shards", "hf")  # pdclip.data.SHARD_SOURCES
        if not shard_source and (self.train_data or self.val_data):
            raise ValueError(f"train_data / val_data are shard patterns, for dataset shards or hf, not {self.dataset!r}")
        if isinstance(self.resume, bool) or self.resume in ("true", "false"):  # configs from before "latest"
            self.resume = "latest" if self.resume in (True, "true") else None
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {self.keep_checkpoints}")
        if self.dataset == "shards" and not (self.train_data or self.data_kwargs.get("urls")):
            raise ValueError("--dataset shards needs the training shards: --train-data 'path/to/shard-{0000..0099}.tar'")
        if self.trainable_text_layers and not (self.pretrained_text and self.freeze_text):
            raise ValueError("trainable_text_layers needs pretrained_text + freeze_text (without freeze_text "
                             "every layer trains)")
        frozen = self.pretrained_text and self.freeze_text and self.pretrained_image and self.freeze_image
        if self.feature_cache and not frozen:
            raise ValueError("feature_cache needs both pretrained towers frozen (the trainable_blocks / "
                             "trainable_text_layers excepted): pretrained_text + freeze_text, "
                             "pretrained_image + freeze_image")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        return cls(**d)

    def with_overrides(self, overrides: dict[str, object]) -> TrainConfig:
        """A copy with `{name: value}` applied; names may be TrainConfig or LossConfig fields.

        String values (from the command line) are converted to the field's type.
        """
        train, loss = self.to_dict(), self.loss.to_dict()
        train_types, loss_types = get_type_hints(TrainConfig), get_type_hints(LossConfig)
        for name, value in overrides.items():
            key = name.removeprefix("loss.")
            if key in loss and key != "loss":
                loss[key] = _convert(key, value, loss_types[key])
            elif name in train and name != "loss":
                train[name] = _convert(name, value, train_types[name])
            else:
                options = sorted(set(train) - {"loss"} | set(loss))
                near = difflib.get_close_matches(name, options, n=1)
                hint = f"did you mean --{near[0]}? " if near else ""
                raise ValueError(f"unknown option --{name}; {hint}see --help for every option")
        return TrainConfig.from_dict({**train, "loss": loss})


def _convert(name: str, value: object, hint: object) -> object:
    """Convert a command-line string to the field type `hint`; other values pass through."""
    if not isinstance(value, str):
        return value
    optional = type(None) in get_args(hint)
    if optional and value.lower() in ("none", "null"):
        return None
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if optional else hint
    base = get_origin(base) or base
    try:
        if base is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if base in (int, float):
            return base(value)
        if base in (dict, tuple, list):
            parsed = json.loads(value)
            if not isinstance(parsed, dict if base is dict else list):
                raise ValueError(value)
            return parsed
    except ValueError as e:
        raise ValueError(f"option --{name} expects {getattr(base, '__name__', base)}, got {value!r}") from e
    return value


def load_config(name_or_path: str) -> TrainConfig:
    """A JSON config file, or the name of one shipped in `pdclip/configs/` (e.g. `tutorial_cpu`)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path.removesuffix('.json')}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no config file {name_or_path!r}; shipped configs: {shipped}")
    return TrainConfig.from_dict(json.loads(path.read_text()))
