"""The analytic training-memory estimate (pyoptim.sparse.memory_estimate) against the measured one
step of training (pyoptim.sparse.measure_memory), and the savings of sparse updates."""
import copy

import pytest
import torch
from torch import nn

from pyoptim.models.mobilenetv2 import mobilenet_v2
from pyoptim.sparse import (SparseUpdateScheme, fuse_bn, layer_names, measure_memory,
                            memory_estimate, scheme_masks)

SHAPE = (3, 96, 96)
BATCH = 2
PAPER = {-1: 0.25, -2: 0.25, -4: 0.125, -5: 0.25, -7: 0.125, -8: 0.25, -10: 0.125, -11: 0.25}
KEYS = ("saved_activations", "gradients", "optimizer_state", "parameters", "total")


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return mobilenet_v2(0.35, num_classes=100)


@pytest.fixture(scope="module")
def fused(plain):
    return fuse_bn(copy.deepcopy(plain).eval())


def schemes(fused):
    return {
        "paper": SparseUpdateScheme.last_layers(fused, 16, PAPER),
        "last8": SparseUpdateScheme.last_layers(fused, 8, {-i: 1.0 for i in range(1, 9)}),
        "bias16": SparseUpdateScheme.last_layers(fused, 16, {}),
    }


def both(model, scheme, **kw):
    return (memory_estimate(model, scheme, SHAPE, BATCH, **kw),
            measure_memory(model, scheme, SHAPE, BATCH, **kw))


def assert_agree(est, meas, what, rel=0.10):
    for k in ("saved_activations", "total"):
        assert est[k] == pytest.approx(meas[k], rel=rel), \
            f"{what}: {k} estimate {est[k]} vs measured {meas[k]}"
    assert est["total"] == sum(est[k] for k in KEYS[:4])
    assert meas["total"] == sum(meas[k] for k in KEYS[:4])


@pytest.mark.parametrize("which", ["plain", "fused"])
def test_full_update_agrees(which, plain, fused):
    model = plain if which == "plain" else fused
    est, meas = both(model, None)
    assert_agree(est, meas, f"full update ({which})")
    n_params = sum(p.numel() for p in model.parameters())
    assert est["gradients"] == meas["gradients"] == 4 * n_params
    assert est["optimizer_state"] == meas["optimizer_state"] == 4 * n_params  # SGD momentum: 1x


@pytest.mark.parametrize("name", ["paper", "last8", "bias16"])
def test_sparse_schemes_agree(name, fused):
    est, meas = both(fused, schemes(fused)[name])
    assert_agree(est, meas, name)
    assert est["gradients"] == meas["gradients"]
    assert est["optimizer_state"] == meas["optimizer_state"]


@pytest.mark.parametrize("name", ["paper", "last8"])
def test_batch_one_agrees(name, fused):
    """At batch 1 the input prefix ``x[:, :k]`` is a contiguous view of all of x: the layers must
    still save a copy of just the prefix, as the estimate assumes."""
    scheme = schemes(fused)[name]
    est = memory_estimate(fused, scheme, SHAPE, 1)
    meas = measure_memory(fused, scheme, SHAPE, 1)
    assert_agree(est, meas, f"{name} at batch 1")
    assert est["saved_activations"] == meas["saved_activations"]


def test_sparse_saves_5x_less_than_full(fused):
    full = measure_memory(fused, None, SHAPE, BATCH)
    sparse = measure_memory(fused, schemes(fused)["paper"], SHAPE, BATCH)
    assert sparse["saved_activations"] * 5 <= full["saved_activations"], (sparse, full)
    assert sparse["total"] < full["total"]


def test_bias_only_saves_far_less_than_weights(fused):
    """Biases only: the sparse convs of the window save nothing of their inputs; with weights they
    save their inputs (full weights) or input prefixes (the paper's ratios). What both keep alike
    is what the backward through the window needs anyway: the ReLU6s' bool masks."""
    s = schemes(fused)
    s["w16"] = SparseUpdateScheme.last_layers(fused, 16, {-i: 1.0 for i in range(1, 17)})
    meas = {k: measure_memory(fused, s[k], SHAPE, BATCH) for k in ("bias16", "paper", "w16")}
    window = set(s["bias16"].bias_layers)

    def conv_saved(r):
        return sum(d["saved"] for d in r["per_layer"] if d["name"] in window)

    assert conv_saved(meas["bias16"]) == 0
    assert conv_saved(meas["paper"]) > 0
    assert conv_saved(meas["paper"]) * 10 <= conv_saved(meas["w16"])
    assert meas["bias16"]["saved_activations"] < meas["paper"]["saved_activations"]
    assert meas["bias16"]["saved_activations"] * 1.5 <= meas["w16"]["saved_activations"]
    # the classifier only (its input is the one activation left to save)
    clf_only = measure_memory(fused, SparseUpdateScheme(), SHAPE, BATCH)
    assert clf_only["saved_activations"] * 10 <= meas["bias16"]["saved_activations"]


def test_relu6_keeps_a_bool_mask(fused):
    """apply_scheme puts MaskReLU6 in place of every ReLU6: inside the window each saves one byte
    per element of its input (a plain in-place ReLU6 saves a float copy of it)."""
    scheme = schemes(fused)["paper"]
    est, meas = both(fused, scheme)
    measured = {d["name"]: d["saved"] for d in meas["per_layer"]}
    relus = [d for d in est["per_layer"] if d["type"] == "MaskReLU6"]
    assert len(relus) == sum(isinstance(m, nn.ReLU6) for m in fused.modules())
    inside = [d for d in relus if d["in_window"]]
    assert len(inside) == 11
    for d in inside:
        numel = int(torch.tensor(d["input_shape"]).prod())
        assert d["saved_rule"] == "bool mask" and d["saved"] == numel == measured[d["name"]], d
    assert all(d["name"] not in measured for d in relus if not d["in_window"])
    clones = sum(4 * int(torch.tensor(d["input_shape"]).prod()) for d in inside)  # plain ReLU6s
    masks = sum(d["saved"] for d in inside)
    assert est["saved_activations"] - masks + clones >= 3 * est["saved_activations"]


def test_masked_way_saves_nothing(fused):
    scheme = schemes(fused)["paper"]
    full = measure_memory(fused, None, SHAPE, BATCH)
    est, meas = both(fused, scheme, masked=True)
    assert_agree(est, meas, "masked")
    assert meas["saved_activations"] == full["saved_activations"]
    assert meas["gradients"] == full["gradients"]


def test_adam_and_sgd_state(fused):
    scheme = schemes(fused)["paper"]
    for opt, factor in (("sgd", 0), ("adam", 2)):
        est, meas = both(fused, scheme, optimizer=opt)
        assert est["optimizer_state"] == meas["optimizer_state"]
        assert abs(meas["optimizer_state"] - factor * meas["gradients"]) <= 4 * 64  # + step counters


def test_estimate_runs_no_autograd_and_leaves_model_alone(fused):
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    flags = [p.requires_grad for p in fused.parameters()]
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        est = memory_estimate(fused, schemes(fused)["paper"], SHAPE, BATCH)
    assert not packed
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())
    assert flags == [p.requires_grad for p in fused.parameters()]
    names = [d["name"] for d in est["per_layer"]]
    assert names[-1] == "<loss>" and "classifier.1" in names
    assert sum(d["saved"] for d in est["per_layer"]) == est["saved_activations"]
    window = [d for d in est["per_layer"] if d["in_window"]]
    assert window[0]["name"] == layer_names(fused)[-17]  # the first of the 16-layer bias window


@pytest.mark.parametrize("n", [3, 1])
def test_rules_on_mixed_modules(n):
    """Module kinds MobileNetV2 does not have (or not in these modes): a frozen plain conv and a
    frozen linear inside the window, BN in train mode, ReLU (in place and not), Hardtanh, pooling,
    dropout; a linear training a feature prefix; batch 1 (prefixes that are contiguous views)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.Hardtanh(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 10))
    names = layer_names(model)
    cases = [None,  # full update
             SparseUpdateScheme([names[1]], {names[1]: 0.5}),  # 2nd conv: later ones frozen
             SparseUpdateScheme([names[0]], {}, train_classifier=True),
             SparseUpdateScheme([names[2], names[3]], {names[2]: 0.25, names[3]: 0.5})]
    for scheme in cases:
        est = memory_estimate(model, scheme, (3, 16, 16), n)
        meas = measure_memory(model, scheme, (3, 16, 16), n)
        for k in KEYS:
            assert est[k] == meas[k], (scheme, k, est[k], meas[k])


def test_scheme_masks(fused):
    scheme = schemes(fused)["paper"]
    masks = scheme_masks(fused, scheme)
    params = dict(fused.named_parameters())
    assert set(masks) == set(params)
    clf = scheme.classifier
    assert masks[clf + ".weight"] is None and masks[clf + ".bias"] is None
    last = layer_names(fused)[-2]  # the last conv: weight ratio 0.25, bias
    w = masks[last + ".weight"]
    assert w.shape == params[last + ".weight"].shape
    assert w[:, : w.shape[1] // 4].all() and not w[:, w.shape[1] // 4 + 1:].any()
    assert masks[last + ".bias"] is None
    first = layer_names(fused)[0]
    assert not masks[first + ".weight"].any()
