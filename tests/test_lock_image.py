"""`freeze_image` + `trainable_blocks` on open_clip image towers: open_clip's `lock()` (LiT; open_clip_train's
`--lock-image`, `--lock-image-unlocked-groups`, `--lock-image-freeze-bn-stats`), offline from a weights file."""

from pathlib import Path

import open_clip
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from pdclip.checkpoint import load_checkpoint
from pdclip.config import TrainConfig
from pdclip.models import create_model, register_model_configs
from pdclip.train import fit, make_optimizer


def weights_file(tmp_path, name: str) -> str:
    """An open_clip checkpoint of `name` (pdclip builds the custom-text variant), standing in for a tag."""
    register_model_configs()
    torch.manual_seed(1)
    path = tmp_path / f"{name}.pt"
    torch.save(open_clip.create_model(name, force_custom_text=True).state_dict(), path)
    return str(path)


def trainable(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("groups", [0, 1, 2])
def test_vit_unlocks_open_clips_last_groups(tmp_path, groups):
    path = weights_file(tmp_path, "pdclip-vit-tiny")
    model = create_model("pdclip-vit-tiny", pretrained_image=path, freeze_image=True, trainable_blocks=groups)
    reference = open_clip.create_model("pdclip-vit-tiny", force_custom_text=True)
    reference.lock_image_tower(unlocked_groups=groups, freeze_bn_stats=True)
    assert trainable(model.visual) == trainable(reference.visual)
    unlocked = {n for n, t in trainable(model.visual).items() if t}
    # 0: nothing; 1: the projection; 2: + the last residual block and the last LayerNorm.
    assert {n.split(".")[0] for n in unlocked} == [set(), {"proj"}, {"proj", "transformer", "ln_post"}][groups]
    assert all(trainable(model.text).values()) and model.logit_scale.requires_grad
    # The optimiser holds exactly the trainable weights: nothing frozen gets an update (or weight decay).
    optimizer = make_optimizer(model, TrainConfig())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_locked_resnet_keeps_weights_and_batchnorm_statistics(tmp_path):
    path = weights_file(tmp_path, "pdclip-rn-tiny")
    initial = torch.load(path, weights_only=True)
    cfg = TrainConfig(model="pdclip-rn-tiny", pretrained_image=path, freeze_image=True, out=str(tmp_path / "run"),
                      steps=2, batch_size=8, warmup_steps=0, save_every=2, snapshot_every=0, progress=False,
                      data_kwargs={"n_train": 8, "n_eval": 8}, device="cpu")
    fit(cfg)
    Path(path).unlink()  # the checkpoint alone rebuilds the model, nothing is looked up
    trained, _ = load_checkpoint(tmp_path / "run")
    modules = list(trained.visual.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    for key, value in trained.visual.state_dict().items():  # weights and running statistics: as loaded
        assert torch.equal(value, initial[f"visual.{key}"]), key
    assert any(not torch.equal(v, initial[f"text.{k}"]) for k, v in trained.text.state_dict().items())


def test_lock_options_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="freeze_image / trainable_blocks need an offline pretrained_image"):
        create_model("pdclip-vit-tiny", freeze_image=True)  # a random tower would stay random
    path = weights_file(tmp_path, "pdclip-rn-tiny")
    with pytest.raises(ValueError, match="trainable_blocks=1 with ModifiedResNet: partial locking not"):
        create_model("pdclip-rn-tiny", pretrained_image=path, freeze_image=True, trainable_blocks=1)
    with pytest.raises(ValueError, match="trainable_blocks needs freeze_image=True"):
        create_model("pdclip-rn-tiny", pretrained_image=path, trainable_blocks=1)
