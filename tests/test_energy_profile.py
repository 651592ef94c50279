"""pyoptim.energy.profile: per-layer FLOPs, bytes and times, the measured roofline."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pyoptim.energy.profile import (LayerProfile, ModelProfile, Roofline, layer_bytes, measure_roofline,
                                    profile_layers)
from pyoptim.flops import count_flops


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_layer_flops_add_up_to_the_model_and_bytes_follow_the_formula():
    """The layers' forward FLOPs sum to the model's forward count and their backward FLOPs to the
    model's backward (the first conv computes no input gradient, as in training)."""
    model, x = _net(), torch.randn(4, 3, 12, 12)
    roof = Roofline("test", 1e10, 1e9)
    prof = profile_layers(model, x, reps=1, model_label="net", roofline=roof)
    fwd, train = count_flops(model, x)
    assert [lp.name for lp in prof.layers] == ["0", "3", "7"] and [lp.kind for lp in prof.layers] == ["conv", "conv", "linear"]
    assert sum(lp.forward_flops for lp in prof.layers) == fwd
    assert sum(lp.backward_flops for lp in prof.layers) == train - fwd
    assert prof.layers[0].backward_flops == prof.layers[0].forward_flops          # weight grad only
    assert prof.layers[1].backward_flops == 2 * prof.layers[1].forward_flops      # weight + input grads
    fc = prof.layers[2]
    # linear 16 -> 5 on [4, 16]: read 64 + 80 + 5, write 20 floats; backward: read 20 + 64 + 80,
    # write 80 + 5 (weight, bias) + 64 (input)
    assert fc.forward_bytes == 4 * (64 + 85 + 20) and fc.backward_bytes == 4 * (20 + 64 + 80 + 85 + 64)
    assert fc.intensity() == fc.forward_flops / fc.forward_bytes
    assert all(lp.forward_seconds > 0 and lp.backward_seconds > 0 for lp in prof.layers)
    assert all(lp.forward_joules is None for lp in prof.layers) and "no energy counter" in prof.extra["energy"]
    assert prof.input_shape == [4, 3, 12, 12] and prof.dtype == "float32" and prof.roofline == roof
    back = ModelProfile.from_dict(prof.to_dict())
    assert back.layers == prof.layers and back.signature == prof.signature


def test_signature_names_layers_and_shapes():
    model = _net()
    a = profile_layers(model, torch.randn(2, 3, 12, 12), reps=1, roofline=Roofline("t", 1, 1))
    b = profile_layers(model, torch.randn(2, 3, 16, 16), reps=1, roofline=Roofline("t", 1, 1))
    c = profile_layers(_net(), torch.randn(2, 3, 12, 12), reps=1, roofline=Roofline("t", 1, 1))
    assert a.signature == c.signature != b.signature


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="has no conv or linear layers"):
        profile_layers(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.randn(2, 3), roofline=Roofline("t", 1, 1))
    with pytest.raises(ValueError, match="reps must be >= 1"):
        profile_layers(_net(), torch.randn(2, 3, 8, 8), reps=0)
    with pytest.raises(ValueError, match="example_input must be a batched tensor"):
        profile_layers(_net(), torch.randn(3))
    with pytest.raises(ValueError, match="phase must be"):
        LayerProfile("a", "conv", 1, 1, 1, 1, 1, 1).intensity("sideways")
    with pytest.raises(ValueError, match="missing fields"):
        ModelProfile.from_dict({"model": "x"})
    with pytest.raises(ValueError, match="matmul_size must be >= 16"):
        measure_roofline("cpu", matmul_size=8)


def test_measured_roofline_and_its_ridge():
    roof = measure_roofline("cpu", matmul_size=128, copy_bytes=4 << 20, reps=2)
    assert roof.peak_flops > 0 and roof.peak_bandwidth > 0
    assert roof.ridge == pytest.approx(roof.peak_flops / roof.peak_bandwidth)
    assert roof.attainable(roof.ridge / 2) == pytest.approx(roof.peak_flops / 2)
    assert roof.attainable(roof.ridge * 4) == roof.peak_flops


class _FakeMeter:
    """A counter that reads 100 W of wall time (a stand-in for NVML/RAPL)."""
    energy_available = True

    def __init__(self):
        import time
        self.t, self.open = time, {}

    def begin_window(self, name):
        self.open[name] = self.t.perf_counter()

    def end_window(self, name):
        class M:
            pass
        m = M()
        m.joules = 100.0 * (self.t.perf_counter() - self.open.pop(name))
        return m


def test_layer_energy_comes_from_meter_windows():
    prof = profile_layers(_net(), torch.randn(2, 3, 8, 8), reps=1, roofline=Roofline("t", 1, 1),
                          meter=_FakeMeter(), energy_window_s=0.05)
    assert prof.extra["energy"] == "measured"
    for lp in prof.layers:
        assert lp.forward_joules > 0 and lp.backward_joules is not None and lp.backward_joules >= 0


def test_layer_bytes_counts_the_input_gradient_only_when_needed():
    lin = nn.Linear(3, 2)
    x, out = torch.randn(5, 3), torch.randn(5, 2)
    f, b_with = layer_bytes(lin, x, out, True)
    _, b_without = layer_bytes(lin, x, out, False)
    assert f == 4 * (15 + 8 + 10) and b_with - b_without == 4 * 15


def test_signature_is_the_one_apply_plan_checks_and_timed_false_counts_only():
    from pyoptim.energy import layer_entries, model_signature, project_profile
    model, x = _net(), torch.randn(2, 3, 12, 12)
    prof = profile_layers(model, x, reps=1, roofline=Roofline("t", 1, 1))
    assert prof.signature == model_signature(layer_entries(model, x))
    assert prof.extra["step_seconds"] > 0
    shapes = profile_layers(model, x, timed=False, roofline=Roofline("t", 1, 1))
    assert [lp.forward_flops for lp in shapes.layers] == [lp.forward_flops for lp in prof.layers]
    assert all(lp.forward_seconds == 0 for lp in shapes.layers) and "step_seconds" not in shapes.extra
    roof = Roofline("gpu", 1e12, 1e11)
    proj = project_profile(shapes, roof, efficiency=0.5)
    lp = proj.layers[1]
    assert lp.forward_seconds == pytest.approx(max(lp.forward_flops / 1e12, lp.forward_bytes / 1e11) / 0.5)
    assert proj.device == "gpu" and proj.signature == prof.signature and "projection" in proj.extra
    with pytest.raises(ValueError, match="efficiency must be in"):
        project_profile(shapes, roof, efficiency=0)


def test_profiling_leaves_the_model_as_it_was():
    model, x = _net(), torch.randn(4, 3, 12, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_layers(model, x, reps=1, roofline=Roofline("t", 1, 1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_energy_command_profiles_plans_and_refuses_bad_input(tmp_path, capsys):
    import json
    from pyoptim import cli
    out = str(tmp_path / "e")
    assert cli.main(["energy", "profile", "--model", "resnet20", "--input-shape", "1,12,12", "--batch-size", "4",
                     "--reps", "1", "--threads", "1", "--out", out]) == 0
    prof = json.loads((tmp_path / "e" / "profile.json").read_text())
    assert prof["model"] == "resnet20" and len(prof["layers"]) == 22
    assert cli.main(["energy", "plan", "--profile", out + "/profile.json", "--device-spec", "tiny", "--out", out]) == 2
    assert "pass --project" in capsys.readouterr().err
    assert cli.main(["energy", "plan", "--profile", out + "/profile.json", "--device-spec", "tiny", "--project",
                     "--max-slowdown", "0.1", "--out", out]) == 0
    plan = json.loads((tmp_path / "e" / "clock_plan.json").read_text())
    assert plan["device"] == "tiny" and len(plan["layers"]) == 22 and plan["step"]["slowdown"] <= 0.1 + 1e-9
    assert plan["step"]["saving"] >= 0
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(SystemExit):
            cli.main(["energy", "plan", "--profile", out + "/profile.json", "--max-slowdown", bad])
        assert "--max-slowdown" in capsys.readouterr().err
    (tmp_path / "d.json").write_text(json.dumps({"name": "x", "clock_pairs": [], "default": [1, 1],
                                                 "peak_flops": 1, "peak_bandwidth": 1,
                                                 "power": {"static_w": 1, "c_sm": 1, "c_mem": 1, "v_min": 1, "v_max": 1}}))
    with pytest.raises(SystemExit):
        cli.main(["energy", "plan", "--profile", out + "/profile.json", "--device-spec", str(tmp_path / "d.json")])
    err = capsys.readouterr().err
    assert "clock_pairs" in err and len(err.strip().splitlines()) == 1
