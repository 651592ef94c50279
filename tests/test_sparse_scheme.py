"""SparseUpdateScheme, apply_scheme and the sparse layers on MobileNetV2."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyoptim
from pyoptim import sparse
from pyoptim.models import mobilenet_v2


def fused_mbv2(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = mobilenet_v2(0.35, num_classes=10).to(dtype)
    with torch.no_grad():  # non-trivial BN statistics, so that folding them is really tested
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return sparse.fuse_bn(m.eval())


def paper_scheme(m):
    return sparse.SparseUpdateScheme.last_layers(
        m, 16, {-1: 0.25, -2: 0.25, -4: 0.125, -5: 0.25, -7: 0.125, -8: 0.25, -10: 0.125, -11: 0.25})


def batch(seed=1, dtype=torch.float64, n=3, size=40):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64).to(dtype),
            torch.randint(0, 10, (n,), generator=g))


def test_fuse_bn_keeps_the_eval_function():
    torch.manual_seed(0)
    m = mobilenet_v2(0.35, num_classes=10).double()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.1, 0.1)
    m.eval()
    x, _ = batch()
    want = m(x)
    sparse.fuse_bn(m)
    assert not any(isinstance(b, nn.BatchNorm2d) for b in m.modules())
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)


def test_apply_scheme_keeps_the_function_and_the_state_dict_keys():
    m = fused_mbv2()
    dense = copy.deepcopy(m)
    sparse.apply_scheme(m, paper_scheme(m))
    x, _ = batch()
    torch.testing.assert_close(m(x), dense(x), rtol=0, atol=0)
    sd = m.state_dict()
    assert list(sd.keys()) == list(dense.state_dict().keys())
    for k, v in dense.state_dict().items():
        assert torch.equal(sd[k], v), k
    # a dense checkpoint loads into the sparse model and back
    other = fused_mbv2(seed=7)
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m(x), other(x), rtol=0, atol=0)
    dense.load_state_dict(m.state_dict())
    torch.testing.assert_close(dense(x), other(x), rtol=0, atol=0)


def test_only_the_schemes_entries_are_trainable():
    m = fused_mbv2()
    s = paper_scheme(m)
    sparse.apply_scheme(m, s)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    want = {f"{n}.bias" for n in s.bias_layers} | {f"{n}.weight_train" for n in s.weight_ratios}
    want |= {"classifier.1.weight", "classifier.1.bias"}
    assert trainable == want
    layer = m.get_submodule("features.17.conv.6")  # the last project conv, ratio 1/4 of its inputs
    assert layer.in_channels == 336
    assert layer.weight_train.shape[1] == 84 and layer.weight_frozen.shape[1] == 252


def test_trained_gradients_equal_dense_autograd_and_frozen_get_none():
    m = fused_mbv2()
    dense = copy.deepcopy(m)
    s = paper_scheme(m)
    sparse.apply_scheme(m, s)
    m.train()
    dense.train()
    x, y = batch()
    torch.manual_seed(3)  # the same dropout mask in both
    F.cross_entropy(m(x), y).backward()
    torch.manual_seed(3)
    F.cross_entropy(dense(x), y).backward()
    dmods = dict(dense.named_modules())
    for name, mod in m.named_modules():
        if isinstance(mod, (sparse.SparseConv2d, sparse.SparseLinear)):
            full = dmods[name].weight.grad
            if mod.trained:
                want = full.narrow(mod.split_dim, 0, mod.trained)
                torch.testing.assert_close(mod.weight_train.grad, want, rtol=1e-10, atol=1e-12)
            if isinstance(mod.bias, nn.Parameter):
                torch.testing.assert_close(mod.bias.grad, dmods[name].bias.grad, rtol=1e-10, atol=1e-12)
            assert mod.weight_frozen.grad is None
    torch.testing.assert_close(m.classifier[1].weight.grad, dense.classifier[1].weight.grad, rtol=1e-10, atol=1e-12)
    # nothing below the window got a gradient
    assert m.features[0][0].weight.grad is None and m.features[5].conv[0].weight.grad is None


def test_frozen_weights_stay_bit_identical_under_sgd_momentum_and_weight_decay():
    m = fused_mbv2(dtype=torch.float32)
    sparse.apply_scheme(m, paper_scheme(m))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    m.train()
    for step in range(4):
        x, y = batch(step, torch.float32)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    after = m.state_dict()
    layer = m.get_submodule("features.17.conv.6")
    k = layer.trained
    w0, w1 = before["features.17.conv.6.weight"], after["features.17.conv.6.weight"]
    assert torch.equal(w0[:, k:], w1[:, k:])            # frozen rest: bit-identical
    assert not torch.equal(w0[:, :k], w1[:, :k])        # trained prefix moved
    assert torch.equal(before["features.3.conv.0.weight"], after["features.3.conv.0.weight"])
    assert torch.equal(before["features.3.conv.0.bias"], after["features.3.conv.0.bias"])


def test_scheme_json_round_trip():
    m = fused_mbv2()
    s = paper_scheme(m)
    again = sparse.SparseUpdateScheme.from_json(s.to_json())
    assert again == s
    with pytest.raises(ValueError, match="unknown fields"):
        sparse.SparseUpdateScheme.from_dict({"bias_layer": []})


@pytest.mark.parametrize("scheme,pattern", [
    (dict(bias_layers=["features.99.conv.0"]), r"unknown layer\(s\) \['features.99.conv.0'\]"),
    (dict(bias_layers=["features.17.conv.6"], weight_ratios={"features.17.conv.6": 1.5}), r"must be in \(0, 1\]"),
    (dict(bias_layers=["features.17.conv.6"], weight_ratios={"features.17.conv.6": 0.0}), r"must be in \(0, 1\]"),
    (dict(bias_layers=["features.17.conv.6"], weight_ratios={"features.16.conv.6": 0.5}), r"outside the bias window"),
    (dict(bias_layers=["classifier.1"]), r"the classifier 'classifier.1' trains in full"),
])
def test_bad_schemes_raise_clear_errors(scheme, pattern):
    m = fused_mbv2()
    with pytest.raises(ValueError, match=pattern):
        sparse.apply_scheme(m, sparse.SparseUpdateScheme(**scheme))


def test_bias_training_needs_biases():
    torch.manual_seed(0)
    m = mobilenet_v2(0.35, num_classes=10)  # not fused: its convs have no bias
    with pytest.raises(ValueError, match="has no bias to train .*fuse_bn"):
        sparse.apply_scheme(m, sparse.SparseUpdateScheme(bias_layers=["features.17.conv.6"]))


def test_trained_channel_rounding():
    assert sparse.trained_channels(192, 0.25) == 48
    assert sparse.trained_channels(10, 0.01) == 1
    assert sparse.trained_channels(10, 1.0) == 10
    assert sparse.trained_channels(12, 0.3, multiple=3) == 6   # whole groups of 3
    assert sparse.trained_channels(12, 0.0) == 0


def test_frozen_layers_inside_the_window_save_nothing():
    m = fused_mbv2()
    s = sparse.SparseUpdateScheme(bias_layers=["features.15.conv.0", "features.17.conv.6"])
    sparse.apply_scheme(m, s)
    gap = m.get_submodule("features.16.conv.0")      # between two trained layers, trains nothing
    assert isinstance(gap, sparse.SparseConv2d) and gap.trained == 0
    assert not any(p.requires_grad for p in gap.parameters())
    below = m.get_submodule("features.14.conv.0")    # below the window: untouched
    assert isinstance(below, nn.Conv2d)
    x, _ = batch()        # 3 samples
    m.train()
    inside, saved_in_gap = [False], []
    gap.register_forward_pre_hook(lambda mod, args: inside.__setitem__(0, True))
    gap.register_forward_hook(lambda mod, args, out: inside.__setitem__(0, False))

    def pack(t):
        if inside[0]:
            saved_in_gap.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    # only the (frozen) weight pieces are saved by the gap layer, never an activation of the batch
    assert saved_in_gap and all(shape[0] != 3 for shape in saved_in_gap), saved_in_gap
    y.sum().backward()
    assert m.get_submodule("features.15.conv.0").bias.grad is not None


def _snapshot(m):
    """Every module (by identity) and every parameter's requires_grad, by name."""
    return ([(n, id(mod)) for n, mod in m.named_modules()],
            [(n, p.requires_grad) for n, p in m.named_parameters()])


def test_apply_scheme_on_a_sparse_model_raises_and_changes_nothing():
    m = fused_mbv2()
    wider = sparse.SparseUpdateScheme.last_layers(m, 20, {-1: 0.5})  # reaches below the first window
    sparse.apply_scheme(m, paper_scheme(m))
    before = _snapshot(m)
    with pytest.raises(ValueError, match=r"apply_scheme: model already has \d+ sparse layer\(s\)"):
        sparse.apply_scheme(m, wider)
    assert _snapshot(m) == before


@pytest.mark.parametrize("n_bias", [60, 53, -1, 2.5])
def test_last_layers_refuses_n_bias_out_of_range(n_bias):
    m = fused_mbv2()
    n = len(sparse.layer_names(m)) - 1       # the classifier is not in the window
    assert n == 52
    with pytest.raises(ValueError, match=rf"n_bias must be an integer in \[0, {n}\] .*{n} conv/linear"):
        sparse.SparseUpdateScheme.last_layers(m, n_bias, {})
    assert len(sparse.SparseUpdateScheme.last_layers(m, n, {}).bias_layers) == n
    assert sparse.SparseUpdateScheme.last_layers(m, 0, {}).bias_layers == []


@pytest.mark.parametrize("ratio", [1.5, -0.5, float("nan"), float("inf"), "0.5", True])
def test_sparse_layers_refuse_ratios_outside_0_1(ratio):
    conv, lin = nn.Conv2d(4, 6, 3, bias=True), nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"SparseConv2d: ratio must be in \(0, 1\]"):
        sparse.SparseConv2d(conv, ratio, True)
    with pytest.raises(ValueError, match=r"SparseLinear: ratio must be in \(0, 1\]"):
        sparse.SparseLinear(lin, ratio, True)
    with pytest.raises(ValueError, match=r"trained_channels: ratio"):
        sparse.trained_channels(4, ratio)


def test_sparse_layers_ratio_zero_freezes_and_one_trains_all():
    conv = nn.Conv2d(4, 6, 3, bias=True)
    frozen, full = sparse.SparseConv2d(conv, 0, True), sparse.SparseConv2d(conv, 1.0, False)
    assert frozen.trained == 0 and not isinstance(frozen.weight_train, nn.Parameter)
    assert full.trained == 4 and full.weight_frozen.shape[1] == 0


@pytest.mark.parametrize("ratio", [1.5, -0.5, 0.0, float("nan"), "0.5"])
def test_schemes_refuse_ratios_outside_0_1_naming_the_layer(ratio):
    pattern = r"weight_ratios\['features.17.conv.6'\] must be in \(0, 1\]"
    with pytest.raises(ValueError, match=pattern):
        sparse.SparseUpdateScheme(["features.17.conv.6"], {"features.17.conv.6": ratio})
    text = '{"bias_layers": ["features.17.conv.6"], "weight_ratios": {"features.17.conv.6": %s}}'
    if not isinstance(ratio, str):
        with pytest.raises(ValueError, match=pattern):
            sparse.SparseUpdateScheme.from_json(text % ("NaN" if ratio != ratio else ratio))
    m = fused_mbv2()
    with pytest.raises(ValueError, match=pattern.replace("features.17.conv.6", "features.18.0")):
        sparse.SparseUpdateScheme.last_layers(m, 4, {-1: ratio})   # the last conv
    s = sparse.SparseUpdateScheme(["features.17.conv.6"], {"features.17.conv.6": 0.5})
    s.weight_ratios["features.17.conv.6"] = ratio     # a scheme edited after construction
    before = _snapshot(m)
    with pytest.raises(ValueError, match=pattern):
        sparse.apply_scheme(m, s)
    assert _snapshot(m) == before


@pytest.mark.parametrize("field,text,missing", [
    ("bias_layers", '{"bias_layers": ["features.17.conv.6", "features.18.conv.0"]}',
     "features.18.conv.0"),
    ("weight_ratios", '{"bias_layers": ["features.17.conv.6"], "weight_ratios": {"head.0": 0.5}}',
     "head.0"),
    ("classifier", '{"classifier": "fc"}', "fc"),
])
def test_a_scheme_naming_a_missing_layer_raises_one_line_and_changes_nothing(field, text, missing):
    m = fused_mbv2()
    scheme = sparse.SparseUpdateScheme.from_json(text)
    before = _snapshot(m)
    for call in (scheme.validate, lambda model: sparse.apply_scheme(model, scheme)):
        with pytest.raises(ValueError) as err:
            call(m)
        msg = str(err.value)
        assert "\n" not in msg and f"SparseUpdateScheme.{field}" in msg and repr(missing) in msg, msg
        assert "'classifier.1'" in msg, msg               # valid names are listed
        assert _snapshot(m) == before


@pytest.mark.parametrize("inplace", [False, True])
def test_mask_relu6_equals_relu6_and_gradchecks(inplace):
    from pyoptim.sparse.modules import MaskReLU6
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64) * 4 + 3
    # (no NaN: torch's own ReLU6 gradient there is 0 or grad depending on the element's position)
    x.view(-1)[:5] = torch.tensor([0.0, 6.0, -0.0, -float("inf"), float("inf")], dtype=torch.float64)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grad.view(-1)[4:8] = float("inf")   # on inputs outside (0, 6) and inside: zeros stay zeros
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = MaskReLU6(inplace)(a * 1), nn.ReLU6(inplace)(b * 1)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    # away from the kinks at 0 and 6
    xc = (torch.rand(2, 3, 5, generator=g, dtype=torch.float64) * 10 - 2)
    xc = xc[(xc.abs() > 1e-3) & ((xc - 6).abs() > 1e-3)].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: MaskReLU6(inplace)(t * 1), (xc,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MaskReLU6(inplace)(x.clone().requires_grad_(True) * 1)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]


def test_apply_scheme_puts_mask_relu6_in_place_of_relu6():
    from pyoptim.sparse.modules import MaskReLU6
    m = fused_mbv2()
    relus = {n: mod.inplace for n, mod in m.named_modules() if isinstance(mod, nn.ReLU6)}
    sparse.apply_scheme(m, paper_scheme(m))
    mods = dict(m.named_modules())
    assert relus and all(isinstance(mods[n], MaskReLU6) and mods[n].inplace == inplace
                         for n, inplace in relus.items())
    assert not any(isinstance(mod, nn.ReLU6) for mod in m.modules())
