"""The FID InceptionV3 against torch-fidelity's copy of the same network (random weights).

pytorch-fid's own network is built on torchvision, which cannot be installed beside the CPU
torch here. torch-fidelity's ``FeatureExtractorInceptionV3`` is a torchvision-free copy of the
same FID network (same block patches, same torchvision key names); its package ``__init__``
imports torchvision, so ``_oracles`` lets only the modules the extractor needs load. Where
torch-fidelity is not installed (``pip install --no-deps torch-fidelity``) the numeric test
skips and only the key-layout facts below are checked.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _oracles import torch_fidelity_importable

from latentdiff.checkpoints.errors import CheckpointError
from latentdiff.eval.inception import FIDInceptionV3, inception_features, load_fid_inception


def _torch_fidelity_extractor():
    if not torch_fidelity_importable():
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def _random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights that keep activations O(1) through all 94 conv layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in FIDInceptionV3().state_dict().items()}
    out = {}
    for key, (shape, dtype) in shapes.items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=dtype)
        else:  # fc
            out[key] = 0.02 * torch.randn(shape, generator=g)
    return out


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth"
    torch.save(_random_weights(), path)
    return path


def test_key_layout_facts():
    """Facts of pytorch-fid's weight file layout (torchvision Inception3 names, 1008 classes, no AuxLogits)."""
    sd = FIDInceptionV3().state_dict()
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["Conv2d_4a_3x3.conv.weight"].shape) == (192, 80, 3, 3)
    assert tuple(sd["Mixed_5b.branch_pool.conv.weight"].shape) == (32, 192, 1, 1)
    assert tuple(sd["Mixed_6b.branch7x7_2.conv.weight"].shape) == (128, 128, 1, 7)
    assert tuple(sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    assert tuple(sd["Mixed_7a.branch7x7x3_4.conv.weight"].shape) == (192, 192, 3, 3)
    assert tuple(sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape) == (384, 384, 3, 1)
    assert tuple(sd["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1008, 2048)
    convs = [k for k in sd if k.endswith("conv.weight")]
    assert len(convs) == 94  # torchvision's Inception3 without AuxLogits
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert all(k.replace("conv.weight", "bn.running_var") in sd for k in convs)


def test_matches_torch_fidelity_network(weight_file):
    extractor_cls = _torch_fidelity_extractor()
    reference = extractor_cls("inception-v3-compat", ["2048", "logits_unbiased"],
                              feature_extractor_weights_path=str(weight_file))
    ours = load_fid_inception(weight_file)
    # Same ordered keys as torch-fidelity's module (the layout of the weight file it reads).
    assert list(ours.state_dict()) == list(reference.state_dict())
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_features, ref_logits = reference(images)
        # torch-fidelity scales uint8 by (x - 128) / 128, pytorch-fid floats by 2 x - 1:
        # x = u / 256 makes the two identical (exact in floating point), and 299 px needs no resize.
        features = ours(images.float() / 256)
    assert features.abs().mean() > 1e-2  # the random network does not collapse to zero
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4 * ref_features.abs().max().item())
    torch.testing.assert_close(ours.logits(features) - ours.fc.bias, ref_logits, rtol=1e-4,
                               atol=1e-4 * ref_logits.abs().max().item())


def test_resize_and_input_forms(weight_file):
    model = load_fid_inception(weight_file)
    image = torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        resized = F.interpolate(image[None].float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        expected = model(resized, resize=False).numpy()
    as_array = image.permute(1, 2, 0).numpy()  # numpy: channels last
    got = inception_features([as_array], model)
    assert got.shape == (1, 2048) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_loading_is_strict_and_clear(tmp_path):
    weights = _random_weights()
    old = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 files
    torch.save(old, tmp_path / "old.pth")
    load_fid_inception(tmp_path / "old.pth")

    missing = dict(weights)
    del missing["Mixed_6c.branch7x7_3.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="Mixed_6c.branch7x7_3.conv.weight"):
        load_fid_inception(tmp_path / "missing.pth")

    imagenet = dict(weights)
    imagenet["fc.weight"] = torch.zeros(1000, 2048)
    imagenet["fc.bias"] = torch.zeros(1000)
    torch.save(imagenet, tmp_path / "inception_v3_google.pth")
    with pytest.raises(CheckpointError, match="torchvision's ImageNet"):
        load_fid_inception(tmp_path / "inception_v3_google.pth")

    torch.save({"weights": weights, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_fid_inception(tmp_path / "pickled.pth")
