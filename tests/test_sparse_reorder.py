"""reorder_channels: any channel mask becomes a prefix and the network computes the same function."""
import copy

import pytest
import torch
from torch import nn

from pyoptim import sparse
from pyoptim.models import mobilenet_v2


def model(seed=0):
    torch.manual_seed(seed)
    m = mobilenet_v2(0.35, num_classes=10).double()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def rand_mask(n, seed, p=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) < p
    mask[n // 2] = True
    return mask


@pytest.mark.parametrize("fused", [False, True])
def test_masks_become_prefixes_and_the_function_stays(fused):
    m = model()
    if fused:
        sparse.fuse_bn(m)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    want = m(x)
    old = copy.deepcopy(m)
    masks = {"features.17.conv.6": rand_mask(336, 1),       # project conv: hidden channels of block 17
             "features.15.conv.3": rand_mask(336, 2),       # a depthwise conv (output-channel prefix)
             "classifier.1": rand_mask(1280, 3)}            # through pool and flatten to the last conv
    perms = sparse.reorder_channels(m, masks)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)
    for name, mask in masks.items():
        k = int(mask.sum())
        new_w = m.get_submodule(name).weight
        old_w = old.get_submodule(name).weight
        dim = 0 if name == "features.15.conv.3" else 1
        torch.testing.assert_close(new_w.narrow(dim, 0, k), old_w.index_select(dim, mask.nonzero().flatten()))
        assert torch.equal(perms[name][:k], mask.nonzero().flatten())
    # the producer of block 17's hidden channels moved with them
    k = int(masks["features.17.conv.6"].sum())
    torch.testing.assert_close(m.features[17].conv[0].weight[:k],
                               old.features[17].conv[0].weight[masks["features.17.conv.6"]])


def test_then_a_scheme_trains_exactly_the_masked_channels():
    m = model()
    sparse.fuse_bn(m)
    mask = rand_mask(336, 4)
    sparse.reorder_channels(m, {"features.17.conv.6": mask})
    ratio = mask.sum().item() / 336
    sparse.apply_scheme(m, sparse.SparseUpdateScheme(["features.17.conv.6"], {"features.17.conv.6": ratio}))
    assert m.get_submodule("features.17.conv.6").trained == int(mask.sum())


def test_residual_stream_channels_are_refused_with_the_node_named():
    m = model()
    with pytest.raises(NotImplementedError, match=r"reach node 'add.*residual add"):
        sparse.reorder_channels(m, {"features.16.conv.0": rand_mask(56, 5)})


def test_bad_masks():
    m = model()
    with pytest.raises(ValueError, match="has 10 entries but the layer has 336 channels"):
        sparse.reorder_channels(m, {"features.17.conv.6": torch.ones(10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="share their channels"):
        sparse.reorder_channels(m, {"features.17.conv.6": rand_mask(336, 6), "features.17.conv.3": rand_mask(336, 7)})
    with pytest.raises(ValueError, match="not a layer"):
        sparse.reorder_channels(m, {"features.99": rand_mask(3, 8)})
