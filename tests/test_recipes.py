"""The frozen-tower recipe notebooks 06–08 import: the config they used to spell out, field by field."""

from pdclip.config import TrainConfig
from pdclip.recipes import frozen_towers

SPELLED_OUT = dict(pretrained_image="efficientnet_lite0", freeze_image=True, image_size=128,
                   pretrained_text="all-MiniLM-L6-v2", freeze_text=True,
                   head="mlp", head_hidden=1024, embed_dim=256, feature_cache=True)


def test_frozen_towers_is_the_config_the_notebooks_spelled_out():
    data = {"n_train": 2000, "n_eval": 500}
    got = frozen_towers(dataset="synthetic", data_kwargs=data, steps=300, batch_size=128, snapshot_every=50,
                        snapshot_size=32, device="cpu", seed=3)
    want = TrainConfig(dataset="synthetic", data_kwargs=data, **SPELLED_OUT, steps=300, batch_size=128,
                       warmup_steps=30, snapshot_every=50, snapshot_size=32, save_every=300, device="cpu", seed=3)
    assert got.to_dict() == want.to_dict()


def test_frozen_towers_takes_loss_fields_and_explicit_schedules():
    cfg = frozen_towers(dataset="clipart", steps=40, warmup_steps=2, method="otter")
    assert (cfg.warmup_steps, cfg.save_every, cfg.loss.method) == (2, 40, "otter")
    assert frozen_towers(steps=5).warmup_steps == 1
