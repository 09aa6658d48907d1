"""The course's training recipes as one call each, so notebooks 06–08 share one frozen-tower config.

`frozen_towers(...)` is `pdclip/configs/frozen_cpu.json` — EfficientNet-Lite0 at 128 px and MiniLM,
both frozen, MLP heads into 256 dimensions, backbone features cached on disk (`pdclip.features`) — with
the notebook's own fields on top. It is what `python -m pdclip.train --config frozen_cpu` trains.
"""

from __future__ import annotations

from pdclip.config import TrainConfig, load_config


def frozen_towers(**fields) -> TrainConfig:
    """The frozen-tower recipe with `fields` (TrainConfig or LossConfig names) applied.

    Mixed precision is left to the device (`precision="auto"`: fp32 on a CPU, autocast on a GPU) unless
    `fields` says otherwise. Given `steps` without `warmup_steps` or `save_every`, the warm-up is a tenth
    of the run (at least one step) and the one checkpoint is the last step.

    Example (notebook 06):
        `frozen_towers(dataset="clipart", data_kwargs={"cache_size": 64}, steps=300, batch_size=128)`
    """
    if "steps" in fields:
        fields = {"warmup_steps": max(1, int(fields["steps"]) // 10), "save_every": fields["steps"], **fields}
    return load_config("frozen_cpu").with_overrides({"precision": "auto", **fields})
