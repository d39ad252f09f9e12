"""Hou et al.'s frozen multi-level extractor: pooled level widths add up, it stays frozen, weights and levels load."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cskd_ray.models import UnknownModelError
from cskd_ray.models.heads import AestheticHead
from cskd_ray.models.multilevel import Backbone, create_multilevel_encoder, describe_multilevel

BACKBONES = [Backbone("test_resnet", levels=(-2, -1)), Backbone("test_efficientnet", levels=(1, 3))]


def test_output_is_the_concatenated_pooled_levels_and_the_extractor_is_frozen() -> None:
    torch.manual_seed(0)
    loaded = create_multilevel_encoder(BACKBONES, image_size=48)
    extractor = loaded.model
    widths = [timm.create_model(b.name, features_only=True, out_indices=b.levels).feature_info.channels()
              for b in BACKBONES]
    assert extractor.widths == widths and loaded.dim == sum(map(sum, widths)) == 192 + 96 + 24 + 48
    assert describe_multilevel(BACKBONES) == widths  # the meta-device description agrees
    # the input is normalised with the first classifier's mean/std; each classifier gets its own
    assert loaded.preprocess.image_size == 48 and loaded.preprocess.mean == (0.5, 0.5, 0.5)
    images01 = torch.rand(3, 3, 48, 48)
    x = (images01 - 0.5) / 0.5
    running = extractor.backbones[0].bn1.running_mean.clone()
    extractor.train()  # asked to train: stays in eval (BatchNorm statistics must not move)
    out = extractor(x.requires_grad_(True))
    assert out.shape == (3, loaded.dim) and out.grad_fn is None
    assert not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    torch.testing.assert_close(extractor.backbones[0].bn1.running_mean, running)
    imagenet = ((images01 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    with torch.no_grad():
        want = [f.mean(dim=(2, 3)) for f in extractor.backbones[0](x.detach())]
        want += [f.mean(dim=(2, 3)) for f in extractor.backbones[1](imagenet)]
    torch.testing.assert_close(out, torch.cat(want, dim=1), rtol=1e-4, atol=1e-5)


def test_a_checkpoint_file_loads_into_the_feature_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    classifier = timm.create_model("test_resnet")
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(tmp_path / "resnet.safetensors"))
    loaded = create_multilevel_encoder([Backbone("test_resnet", str(tmp_path / "resnet.safetensors"), (-1,))])
    assert loaded.weights.startswith("sha256:") and loaded.dim == 96 and loaded.preprocess.image_size == 160
    features, source = loaded.model.backbones[0].state_dict(), classifier.state_dict()
    assert set(features) <= set(source) and "conv1.0.weight" in features  # the classifier head is left out
    assert all(torch.equal(features[k], source[k]) for k in features)


def test_bad_names_and_levels_fail_with_the_valid_choices() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown timm encoder model 'test_resnett'.*test_resnet"):
        describe_multilevel([Backbone("test_resnett")])
    with pytest.raises(ValueError, match=r"levels \[0, 5\]: test_resnet has 5 feature levels, 0..4"):
        create_multilevel_encoder([Backbone("test_resnet", levels=(0, 5))])


def test_mlp_head_embeds_its_hidden_layer_and_a_linear_head_keeps_its_keys() -> None:
    torch.manual_seed(0)
    head = AestheticHead(12, "distribution", 10, dropout=0.1, hidden=6).eval()
    features = torch.randn(4, 12)
    hidden = head.embed(features)
    assert head.embed_dim == 6 and hidden.shape == (4, 6)
    torch.testing.assert_close(hidden, torch.nn.functional.gelu(head.net[1](features)))
    torch.testing.assert_close(head(features), head.net[-1](hidden).softmax(-1))
    assert list(AestheticHead(12, "scalar").state_dict()) == ["net.1.weight", "net.1.bias"]  # old folders load
