"""The device model, the exact clock planner against brute force, and applying a plan through a
simulated controller (docs/energy.md, "Device model", "Clock planner", "Applying a plan"). No
test touches a real GPU's clocks: NVML is a fake module where it appears."""
import dataclasses
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from pyoptim.energy.apply import NvmlController, SimulatedController, apply_plan, layer_entries
from pyoptim.energy.device import (DeviceSpec, PowerModel, PowerSample, fit_power_model, nvml_device,
                                   simulated_device)
from pyoptim.energy.planner import ClockPlan, exhaustive_plan, phase_costs, plan_clocks, utilisations
from pyoptim.energy.profile import LayerProfile, ModelProfile, Roofline, model_signature

DELTAS = (0.0, 0.02, 0.05, 0.1, 0.3)


# ---- random instances ------------------------------------------------------------------------

def random_device(rng: np.random.Generator, name: str = "rand") -> DeviceSpec:
    """4-8 pairs over one to three memory clocks (graphics clocks listed per memory clock), a
    random default, a random power model and switch latency (zero, small or comparable to a
    layer)."""
    n_pairs = int(rng.integers(4, 9))
    mems = sorted(rng.choice(np.arange(400, 2001, 100), size=int(rng.integers(1, 4)), replace=False).tolist())
    pairs = set()
    while len(pairs) < n_pairs:
        pairs.add((int(rng.choice(mems)), int(rng.integers(2, 30)) * 50))
    pairs = sorted(pairs)
    power = PowerModel(static_w=float(rng.uniform(5, 60)), c_sm=float(rng.uniform(0.02, 0.3)),
                       c_mem=float(rng.uniform(0.005, 0.08)), v_min=float(rng.uniform(0.55, 0.8)),
                       v_max=float(rng.uniform(0.85, 1.2)), mem_base=float(rng.choice([0.0, rng.uniform(0, 0.02)])))
    latency = float(rng.choice([0.0, rng.uniform(1e-5, 1e-4), rng.uniform(1e-4, 3e-3)]))
    return DeviceSpec(name, tuple(pairs), pairs[int(rng.integers(len(pairs)))], 1e12, 1e11, power, latency)


def random_profile(rng: np.random.Generator, device: DeviceSpec, n_layers: int, step_extra: bool = True) -> ModelProfile:
    """Layers from compute- to memory-bound, measured 1-3x their roofline bound, and now and then
    faster than it (efficiency capped)."""
    layers = []
    for i in range(n_layers):
        row = {}
        for phase, scale in (("forward", 1.0), ("backward", 2.0)):
            flops = 10 ** rng.uniform(7, 9) * scale
            nbytes = flops / 10 ** rng.uniform(0, 2.5)
            bound = max(flops / device.peak_flops, nbytes / device.peak_bandwidth)
            factor = rng.uniform(0.8, 1.0) if rng.random() < 0.15 else rng.uniform(1.0, 3.0)
            row.update({f"{phase}_flops": flops, f"{phase}_bytes": nbytes, f"{phase}_seconds": bound * factor})
        layers.append(LayerProfile(name=f"layer{i}", kind="conv", **row))
    extra = {}
    if step_extra:
        extra["step_seconds"] = sum(lp.forward_seconds + lp.backward_seconds for lp in layers) * rng.uniform(1.0, 1.5)
    return ModelProfile("random", "sig", device.name, [2, 3, 8, 8], "float32", layers,
                        Roofline(device.name, device.peak_flops, device.peak_bandwidth), extra)


def energy(plan: ClockPlan) -> float:
    return (plan.forward if plan.scope == "forward" else plan.step)["joules"]


def figures(plan: ClockPlan):
    return plan.forward if plan.scope == "forward" else plan.step


# ---- the time and energy model ---------------------------------------------------------------

def test_time_model_equals_measured_at_default_and_scales_analytically():
    rng = np.random.default_rng(1)
    for _ in range(20):
        device = random_device(rng)
        profile = random_profile(rng, device, 3)
        mem0, sm0 = device.default
        for lp in profile.layers:
            for phase in ("forward", "backward"):
                seconds, joules, eff, capped = phase_costs(lp, phase, device)
                flops, nbytes, measured = (getattr(lp, f"{phase}_{f}") for f in ("flops", "bytes", "seconds"))
                bound0 = max(flops / device.peak_flops, nbytes / device.peak_bandwidth)
                if capped:
                    assert eff == 1.0 and measured < bound0
                    assert seconds[device.default_index] == pytest.approx(bound0, rel=1e-15)
                else:
                    assert seconds[device.default_index] == measured       # exactly, by construction
                    assert eff == pytest.approx(bound0 / measured, rel=1e-15)
                for k, (mem, sm) in enumerate(device.clock_pairs):
                    tc = flops / (device.peak_flops * sm / sm0)
                    tm = nbytes / (device.peak_bandwidth * mem / mem0)
                    t = max(tc, tm) / eff
                    assert seconds[k] == pytest.approx(t, rel=1e-13)
                    p = device.power
                    v = p.v_min + (p.v_max - p.v_min) * (sm - device.sm_range[0]) / (device.sm_range[1] - device.sm_range[0])
                    watts = p.static_w + p.c_sm * (tc / t) * sm * v * v + p.c_mem * (tm / t) * mem + p.mem_base * mem
                    assert joules[k] == pytest.approx(watts * t, rel=1e-13)


def test_capped_layer_is_modelled_at_the_bound_and_noted():
    device = simulated_device("tiny")
    lp = LayerProfile("fast", "linear", 1e9, 2e9, 1e6, 2e6, 1e-3, 2e-3)      # bound 0.02 s > 1e-3 s
    seconds, _, eff, capped = phase_costs(lp, "forward", device)
    assert capped and eff == 1.0
    assert seconds[device.default_index] == pytest.approx(1e9 / device.peak_flops, rel=1e-15)
    profile = ModelProfile("m", "s", "tiny", [1], "float32", [lp], Roofline("tiny", 5e10, 1e10))
    plan = plan_clocks(profile, device, 0.05)
    assert plan.notes and "capped" in plan.notes[0]


def test_utilisations_feed_the_power_fit():
    device = simulated_device("tiny")
    uc, um = utilisations(1e9, 1e8, 0.04, 1200, 800, device)
    assert uc == pytest.approx(1e9 / 5e10 / 0.04) and um == pytest.approx(1e8 / 1e10 / 0.04)


# ---- the exact DP against brute force ----------------------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_dp_equals_exhaustive_on_random_instances(seed):
    rng = np.random.default_rng(100 + seed)
    device = random_device(rng)
    profile = random_profile(rng, device, int(rng.integers(3, 6)), step_extra=bool(seed % 2))
    for scope in ("forward", "step"):
        for delta in DELTAS:
            dp = plan_clocks(profile, device, delta, scope)
            ref = exhaustive_plan(profile, device, delta, scope)
            assert energy(dp) == pytest.approx(energy(ref), rel=1e-9, abs=0), (scope, delta)
            for plan in (dp, ref):
                fig = figures(plan)
                assert fig["seconds"] <= (1 + delta) * fig["default_seconds"] * (1 + 1e-12)
                assert fig["joules"] <= fig["default_joules"] * (1 + 1e-12)
            assert dp.solver["method"] == "dp" and dp.solver["labels_kept"] >= len(profile.layers)
            assert dp.solver["lower_bound_joules"] <= energy(dp) * (1 + 1e-9)


@pytest.mark.parametrize("scope", ["forward", "step"])
def test_delta_zero_never_slower_and_savings_monotone(scope):
    rng = np.random.default_rng(7)
    for _ in range(10):
        device = random_device(rng)
        profile = random_profile(rng, device, 5)
        savings = []
        for delta in DELTAS:
            plan = plan_clocks(profile, device, delta, scope)
            fig = figures(plan)
            if delta == 0.0:
                assert fig["seconds"] <= fig["default_seconds"] * (1 + 1e-12)
            savings.append(fig["saving"])
        assert all(b >= a - 1e-12 for a, b in zip(savings, savings[1:])), savings


def test_switches_are_counted_in_time_and_energy():
    rng = np.random.default_rng(11)
    for scope in ("forward", "step"):
        for _ in range(10):
            device = dataclasses.replace(random_device(rng), switch_latency_s=2e-4)
            profile = random_profile(rng, device, 4)
            plan = exhaustive_plan(profile, device, 0.3, scope)
            fig = figures(plan)
            rest = plan.rest_seconds if scope == "step" else 0.0
            layers = sum(r["seconds"] for r in plan.layers)
            assert fig["seconds"] == pytest.approx(layers + plan.switches * 2e-4 + rest, rel=1e-12)
            # forward: D, 1..n, D; step: D, 1..n, n..1, D (a palindrome: each change twice)
            seq = [plan.default_pair] + plan.pairs() + ([plan.default_pair] if scope == "forward" else [])
            changes = sum(a != b for a, b in zip(seq, seq[1:]))
            assert plan.switches == (changes if scope == "forward" else 2 * changes)
            idle = device.idle_watts * 2e-4 * plan.switches
            rest_j = fig["joules"] - sum(r["joules"] for r in plan.layers) - idle
            if scope == "forward":
                assert rest_j == pytest.approx(0.0, abs=1e-12 * fig["joules"])


def test_huge_switch_latency_keeps_the_default_clocks():
    rng = np.random.default_rng(5)
    for _ in range(10):
        device = dataclasses.replace(random_device(rng), switch_latency_s=10.0)
        profile = random_profile(rng, device, 5)
        for scope in ("forward", "step"):
            plan = plan_clocks(profile, device, 0.3, scope)
            assert plan.switches == 0 and set(plan.pairs()) == {device.default}


def test_no_feasible_plan_is_impossible_at_nonnegative_slowdown():
    # the all-default plan always meets (1 + delta) x its own time: the planner asserts it
    rng = np.random.default_rng(3)
    for _ in range(10):
        device = random_device(rng)
        profile = random_profile(rng, device, 3)
        for scope in ("forward", "step"):
            assert figures(plan_clocks(profile, device, 0.0, scope))["seconds"] > 0


def test_a100_like_resnet_sized_plan_is_quick():
    device = dataclasses.replace(simulated_device("a100-like"), switch_latency_s=1e-3)
    rng = np.random.default_rng(0)
    layers = []
    for i in range(54):
        flops = 10 ** rng.uniform(11, 12.5)
        nbytes = flops / 10 ** rng.uniform(1, 3.5)
        bound = max(flops / device.peak_flops, nbytes / device.peak_bandwidth)
        layers.append(LayerProfile(f"l{i}", "conv", flops, 2 * flops, nbytes, 2.5 * nbytes,
                                   bound * rng.uniform(1.1, 3), 2.2 * bound * rng.uniform(1.1, 3)))
    profile = ModelProfile("resnet-like", "s", device.name, [256, 3, 224, 224], "bfloat16", layers,
                           Roofline(device.name, device.peak_flops, device.peak_bandwidth))
    for scope in ("forward", "step"):
        plan = plan_clocks(profile, device, 0.05, scope)
        assert plan.solver["seconds"] < 10 and figures(plan)["saving"] > 0
        assert len(plan.front) >= 1


# ---- bad input -------------------------------------------------------------------------------

def test_planner_bad_input_one_line_each():
    device = simulated_device("tiny")
    profile = random_profile(np.random.default_rng(0), device, 3)
    for bad in (-0.01, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="max_slowdown"):
            plan_clocks(profile, device, bad)
    with pytest.raises(ValueError, match="scope"):
        plan_clocks(profile, device, 0.05, scope="backward")
    empty = dataclasses.replace(profile, layers=[])
    with pytest.raises(ValueError, match="no layers.*conv or linear"):
        plan_clocks(empty, device)
    with pytest.raises(ValueError, match="no layers"):
        exhaustive_plan(empty, device)
    zero = dataclasses.replace(profile, layers=[dataclasses.replace(profile.layers[0], forward_seconds=0.0)])
    with pytest.raises(ValueError, match="layer0.*forward_seconds"):
        plan_clocks(zero, device)
    big = random_profile(np.random.default_rng(0), device, 12)
    with pytest.raises(ValueError, match="max_assignments"):
        exhaustive_plan(big, device)


def test_device_bad_input_one_line_each():
    good = simulated_device("tiny").to_dict()
    cases = [({"clock_pairs": []}, "clock_pairs is empty"),
             ({"default": [800, 1300]}, "default .* not among clock_pairs"),
             ({"peak_flops": 0}, "peak_flops must be > 0"),
             ({"peak_bandwidth": -1.0}, "peak_bandwidth must be > 0"),
             ({"switch_latency_s": -1e-3}, "switch_latency_s must be >= 0"),
             ({"clock_pairs": [[800, -5]], "default": [800, -5]}, "clock_pairs entries must be positive"),
             ({"power": {**good["power"], "static_w": -1}}, "static_w must be >= 0")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            DeviceSpec.from_dict({**good, **change})
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"missing fields \['clock_pairs'\]"):
        DeviceSpec.from_dict({k: v for k, v in good.items() if k != "clock_pairs"})
    with pytest.raises(ValueError, match="unknown fields"):
        DeviceSpec.from_dict({**good, "colour": "green"})


def test_device_json_round_trip(tmp_path):
    for name in ("tiny", "a100-like"):
        device = simulated_device(name)
        assert DeviceSpec.load(device.save(str(tmp_path / f"{name}.json"))) == device
    a100 = simulated_device("a100-like")
    assert len(a100.clock_pairs) == 81 and a100.default == (1215, 1410) and a100.sm_range == (210, 1410)
    p = a100.power
    assert p.static_w + (p.c_sm + p.sm_base) * 1410 * p.v_max ** 2 + p.c_mem * 1215 == pytest.approx(400.0)  # TDP
    # a memory-bound kernel at the default clocks draws far above idle (the clocked, stalled SMs)
    assert a100.watts(1410, 1215, 0.0, 1.0) == pytest.approx(240.0) and a100.idle_watts == pytest.approx(180.0)
    with pytest.raises(ValueError, match="simulated_device: name"):
        simulated_device("h900")


def test_clock_plan_json_round_trip(tmp_path):
    device = simulated_device("tiny")
    plan = plan_clocks(random_profile(np.random.default_rng(2), device, 4), device, 0.1)
    again = ClockPlan.load(plan.save(str(tmp_path / "plan.json")))
    assert again.to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match=r"clock plan: missing fields \['signature'\]"):
        ClockPlan.from_dict({k: v for k, v in plan.to_dict().items() if k != "signature"})


# ---- the power model fit ---------------------------------------------------------------------

def _samples(truth: PowerModel, sm_range, rng):
    out = []
    for sm in np.linspace(sm_range[0], sm_range[1], 6):
        for mem in (800.0, 1600.0):
            for uc, um in ((0.9, 0.2), (0.3, 0.8), (0.6, 0.5)):
                seconds = float(rng.uniform(0.5, 2.0))
                watts = truth.watts(sm, mem, uc, um, sm_range)
                out.append(PowerSample(float(sm), mem, seconds, float(watts) * seconds, uc, um))
    return out


def test_fit_power_model_recovers_known_parameters():
    rng = np.random.default_rng(0)
    sm_range = (300.0, 1500.0)
    truth = PowerModel(static_w=42.0, c_sm=0.17, c_mem=0.031, v_min=0.68, v_max=1.05)
    start = PowerModel(static_w=10.0, c_sm=0.05, c_mem=0.01, v_min=0.68, v_max=1.05)
    fitted = fit_power_model(_samples(truth, sm_range, rng), sm_range, start)
    for f in ("static_w", "c_sm", "c_mem"):
        assert getattr(fitted, f) == pytest.approx(getattr(truth, f), rel=1e-6)
    # with v_max held, v_min is identifiable from several SM clocks
    start_v = dataclasses.replace(start, v_min=0.9)
    fitted = fit_power_model(_samples(truth, sm_range, rng), sm_range, start_v,
                             fit=("static_w", "c_sm", "c_mem", "v_min"))
    for f in ("static_w", "c_sm", "c_mem", "v_min"):
        assert getattr(fitted, f) == pytest.approx(getattr(truth, f), rel=1e-5)
    with pytest.raises(ValueError, match="both v_min and v_max"):
        fit_power_model(_samples(truth, sm_range, rng), sm_range, start, fit=("c_sm", "v_min", "v_max"))
    with pytest.raises(ValueError, match="fit must name"):
        fit_power_model(_samples(truth, sm_range, rng), sm_range, start, fit=("voltage",))


# ---- NVML (a fake module: nothing real is read or set) -----------------------------------------

class FakeNvml(types.ModuleType):
    NVML_CLOCK_GRAPHICS, NVML_CLOCK_MEM = 0, 2

    def __init__(self):
        super().__init__("pynvml")
        self.calls = []

    def __getattr__(self, name):
        if not name.startswith("nvml"):
            raise AttributeError(name)
        answers = {"nvmlDeviceGetName": b"Fake GPU", "nvmlDeviceGetSupportedMemoryClocks": [1600, 800],
                   "nvmlDeviceGetPowerManagementDefaultLimit": 300000, "nvmlDeviceGetHandleByIndex": "h"}

        def call(*args):
            self.calls.append((name,) + args[1:])
            if name == "nvmlDeviceGetSupportedGraphicsClocks":
                return [1500, 1000, 500] if args[1] == 1600 else [800, 400]
            if name == "nvmlDeviceGetDefaultApplicationsClock":
                return 1600 if args[1] == self.NVML_CLOCK_MEM else 1500
            return answers.get(name)
        return call


def test_nvml_device_reads_pairs_and_sets_nothing(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    device = nvml_device(0, roofline=Roofline("Fake GPU", 1e13, 1e12))
    assert device.name == "Fake GPU" and device.default == (1600, 1500)
    assert device.clock_pairs == ((1600, 1500), (1600, 1000), (1600, 500), (800, 800), (800, 400))
    assert not [c for c in fake.calls if "Set" in c[0] or "Reset" in c[0]]
    assert fake.calls[-1][0] == "nvmlShutdown"


def test_nvml_absent_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)      # import pynvml raises ImportError
    with pytest.raises(RuntimeError, match="nvml_device: NVML is unavailable"):
        nvml_device(0, roofline=Roofline("x", 1.0, 1.0))
    with pytest.raises(ValueError, match="roofline is required"):
        nvml_device(0)


def test_nvml_controller_calls_locked_clocks(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    ctl = NvmlController(0)
    fake.calls.clear()
    ctl.set_clocks(1600, 1000)
    ctl.set_clocks(800, 400)
    ctl.reset_clocks()
    assert [c for c in fake.calls] == [
        ("nvmlDeviceSetGpuLockedClocks", 1000, 1000), ("nvmlDeviceSetMemoryLockedClocks", 800, 800),
        ("nvmlDeviceSetGpuLockedClocks", 400, 400), ("nvmlDeviceResetGpuLockedClocks",),
        ("nvmlDeviceResetMemoryLockedClocks",)]
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    ok, why = ctl.permission()
    assert not ok and "root" in why


# ---- applying a plan -------------------------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(64, 5))


def plan_for(model, pairs, scope="step", device="tiny", x_shape=(2, 3, 8, 8)) -> ClockPlan:
    entries = layer_entries(model, torch.zeros(x_shape))
    rows = [{"name": e[0], "kind": e[1], "mem_mhz": p[0], "sm_mhz": p[1]} for e, p in zip(entries, pairs)]
    return ClockPlan("small", model_signature(entries), device, list(x_shape), scope, 0.05,
                     {"mem_mhz": 800, "sm_mhz": 1200}, rows, {}, {}, 0, 1e-3, 0.0, {})


A, B = (400, 600), (800, 400)


def test_layer_entries_and_signature():
    model = small_model().train()
    entries = layer_entries(model, torch.zeros(2, 3, 8, 8))
    assert entries == [("0", "conv", (4, 3, 3, 3), (2, 3, 8, 8)), ("2", "conv", (4, 4, 3, 3), (2, 4, 6, 6)),
                       ("5", "linear", (5, 64), (2, 64))]
    assert model.training
    assert model_signature(entries) == model_signature(layer_entries(small_model(), torch.zeros(2, 3, 8, 8)))


def calls(ctl):
    return [(c["op"], c["layer"], c["phase"]) + ((c["mem_mhz"], c["sm_mhz"]) if c["op"] == "set" else ())
            for c in ctl.calls]


def test_apply_step_sequence_matches_plan():
    model = small_model()
    ctl = SimulatedController("tiny", switch_latency_s=1e-3)
    with apply_plan(model, plan_for(model, [A, A, B]), ctl) as applied:
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        assert ctl.clocks is None                          # back to default once layer 0's backward ended
    assert calls(ctl) == [("set", "0", "forward") + A,     # no change at "2": it shares A
                          ("set", "5", "forward") + B,     # backward of 5: already B
                          ("set", "2", "backward") + A,    # backward of 0: already A
                          ("reset", "0", "after backward")]
    assert applied.switches == 4 and ctl.t == pytest.approx(4e-3)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_apply_forward_scope_and_no_grad_forward():
    model = small_model()
    ctl = SimulatedController("tiny")
    with apply_plan(model, plan_for(model, [A, (800, 1200), A], scope="forward"), ctl):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert calls(ctl) == [("set", "0", "forward") + A, ("reset", "2", "forward"), ("set", "5", "forward") + A,
                          ("reset", "5", "after forward")]
    ctl = SimulatedController("tiny")
    with apply_plan(model, plan_for(model, [A, A, B]), ctl), torch.no_grad():
        model(torch.randn(2, 3, 8, 8))                     # step plan, but no backward follows
    assert calls(ctl)[-1] == ("reset", "5", "after forward") and ctl.clocks is None


def test_apply_restores_defaults_after_an_exception():
    model = small_model()
    ctl = SimulatedController("tiny")
    with pytest.raises(KeyError):
        with apply_plan(model, plan_for(model, [A, B, B]), ctl):
            model(torch.randn(2, 3, 8, 8))
            raise KeyError("user code fails mid-step")
    assert ctl.calls[-1]["op"] == "reset" and ctl.calls[-1]["phase"] == "exit" and ctl.clocks is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    failing = SimulatedController("tiny", fail_on_set=1)     # the second set fails inside a hook
    with pytest.raises(RuntimeError, match="simulated"):
        with apply_plan(model, plan_for(model, [A, B, B]), failing):
            model(torch.randn(2, 3, 8, 8))
    assert failing.calls[-1]["op"] == "reset" and failing.clocks is None


def test_apply_dry_run_changes_nothing(capsys):
    model = small_model()
    ctl = SimulatedController("tiny", permitted=False)
    with apply_plan(model, plan_for(model, [A, A, B]), ctl, dry_run=True) as applied:
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert ctl.calls == []
    assert [e["op"] for e in applied.events] == ["set", "set", "set", "reset"]
    out = capsys.readouterr().out
    assert "0: memory 400 MHz, SM 600 MHz" in out and "would set" in out


def test_apply_refusals_change_nothing():
    model = small_model()
    denied = SimulatedController("tiny", permitted=False)
    with pytest.raises(PermissionError, match="apply_plan: .*denies"):
        apply_plan(model, plan_for(model, [A, A, B]), denied)
    assert denied.calls == []
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(288, 5))
    with pytest.raises(ValueError, match="apply_plan: the plan was made for model 'small'"):
        apply_plan(other, plan_for(model, [A, A, B]), SimulatedController("tiny"))
    with pytest.raises(ValueError, match="apply_plan: the plan was made for device 'tiny'"):
        apply_plan(model, plan_for(model, [A, A, B]), SimulatedController("a100-like"))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_apply_a_planned_profile_end_to_end():
    # plan_clocks on a profile whose signature is the model's, then applied through the simulator
    model = small_model()
    x = torch.zeros(2, 3, 8, 8)
    entries = layer_entries(model, x)
    device = simulated_device("tiny")
    rng = np.random.default_rng(4)
    profile = random_profile(rng, device, len(entries))
    profile = dataclasses.replace(profile, signature=model_signature(entries), model="small",
                                  input_shape=list(x.shape),
                                  layers=[dataclasses.replace(lp, name=e[0], kind=e[1])
                                          for lp, e in zip(profile.layers, entries)])
    plan = plan_clocks(profile, device, 0.3, "step")
    ctl = SimulatedController("tiny")
    with apply_plan(model, plan, ctl) as applied:
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    forward_changes = sum(a != b for a, b in zip([plan.default_pair] + plan.pairs(), plan.pairs() + [plan.default_pair]))
    assert applied.switches == plan.switches == 2 * forward_changes
    assert ctl.clocks is None
