"""pyoptim.energy.Meter and the energy plug-in (docs/energy.md, "Meter", "Energy per phase in
training"): the RAPL reader on a fake powercap tree (domains, wraparound, unreadable files), NVML
through a fake module (energy counter, power sampling on a fake clock, read only), the none
backend (time only, the reason), nesting and totals, bad input, the plug-in on a small Trainer
run (with PruneTrain), the CLI flag and the report's energy section. No assertion depends on how
fast anything runs."""
import copy
import json
import os
import pickle
import sys
import threading

import pytest
import torch
from torch import nn

from pyoptim.energy import EnergyPlugin, EnergyUnavailable, Meter
from pyoptim.energy.meter import PowerIntegrator
from pyoptim.energy.plugin import PHASES
from pyoptim.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    """Seconds that move only when the test moves them (``tick``: and by that much per reading).
    ``seen()`` is the last value this thread read (a fake power reading at that same instant,
    whatever the test thread sets meanwhile)."""

    def __init__(self, t=0.0, tick=0.0):
        self.t, self.tick = t, tick
        self.lock = threading.Lock()
        self.local = threading.local()

    def __call__(self):
        with self.lock:
            self.t += self.tick
            self.local.t = self.t
            return self.t

    def seen(self):
        return getattr(self.local, "t", self.t)


def write_zone(root, zone, name, energy_uj, max_uj=10**12):
    d = root / zone
    d.mkdir(exist_ok=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")


def set_energy(root, zone, energy_uj):
    (root / zone / "energy_uj").write_text(f"{energy_uj}\n")


class FakeNvml:
    """What pynvml offers that the meter may use, and nothing else: a ``nvmlDeviceSet*`` call would
    be an AttributeError. ``energy_mj()`` / ``power_mw()`` give the readings (``None``: not
    supported); every call is recorded."""

    class NVMLError(Exception):
        pass

    def __init__(self, energy_mj=None, power_mw=None, init_error=None, gpus=2):
        self.energy_mj, self.power_mw, self.init_error, self.gpus = energy_mj, power_mw, init_error, gpus
        self.calls, self.inits = [], 0

    def nvmlInit(self):
        self.calls.append("nvmlInit")
        if self.init_error:
            raise self.NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self):
        self.calls.append("nvmlShutdown")
        self.inits -= 1

    def nvmlDeviceGetHandleByIndex(self, i):
        self.calls.append("nvmlDeviceGetHandleByIndex")
        if not 0 <= i < self.gpus:
            raise self.NVMLError("Invalid Argument")
        return ("gpu", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append("nvmlDeviceGetHandleByUUID")
        return ("gpu", uuid)

    def nvmlDeviceGetName(self, handle):
        return b"Fake V100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.calls.append("nvmlDeviceGetTotalEnergyConsumption")
        if self.energy_mj is None:
            raise self.NVMLError("Not Supported")
        return self.energy_mj()

    def nvmlDeviceGetPowerUsage(self, handle):
        self.calls.append("nvmlDeviceGetPowerUsage")
        if self.power_mw is None:
            raise self.NVMLError("Not Supported")
        return self.power_mw()


@pytest.fixture
def no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# ----------------------------------------------------------------------------------------------
# RAPL

def test_rapl_sums_the_packages_and_dram_and_names_them(tmp_path):
    write_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    write_zone(tmp_path, "intel-rapl:0:0", "core", 500)          # inside package-0: not added
    write_zone(tmp_path, "intel-rapl:0:1", "dram", 7_000)
    write_zone(tmp_path, "intel-rapl:1", "package-1", 2_000_000)
    write_zone(tmp_path, "intel-rapl:2", "psys", 9_000)          # contains the packages: not added
    (tmp_path / "intel-rapl-mmio:0").mkdir()                     # another driver's zone
    clock = FakeClock()
    m = Meter("rapl", rapl_root=str(tmp_path), clock=clock)
    assert m.energy_available and m.backend == "rapl" and m.unavailable_reason == ""
    assert m.domains == ("package-0 (intel-rapl:0)", "package-1 (intel-rapl:1)", "dram (intel-rapl:0:1)")
    m.begin_window("step")
    set_energy(tmp_path, "intel-rapl:0", 3_000_000)              # +2 J
    set_energy(tmp_path, "intel-rapl:0:1", 1_007_000)            # +1 J
    set_energy(tmp_path, "intel-rapl:1", 2_500_000)              # +0.5 J
    set_energy(tmp_path, "intel-rapl:0:0", 100_000_500)          # ignored
    set_energy(tmp_path, "intel-rapl:2", 100_009_000)            # ignored
    clock.t = 2.0
    r = m.end_window("step")
    assert r.joules == pytest.approx(3.5, abs=1e-12) and r.seconds == 2.0
    assert r.watts == pytest.approx(1.75) and r.backend == "rapl"


def test_rapl_corrects_the_wraparound(tmp_path):
    write_zone(tmp_path, "intel-rapl:0", "package-0", 9_000_000, max_uj=10_000_000)
    m = Meter("rapl", rapl_root=str(tmp_path), clock=FakeClock())
    m.begin_window("w")
    set_energy(tmp_path, "intel-rapl:0", 500_000)                # wrapped: 1 J to the top, 0.5 J after
    assert m.end_window("w").joules == pytest.approx(1.5, abs=1e-12)
    # a window longer than one range is right when something reads inside it
    m.begin_window("long")
    set_energy(tmp_path, "intel-rapl:0", 9_500_000)
    m.read()
    set_energy(tmp_path, "intel-rapl:0", 1_000_000)
    assert m.end_window("long").joules == pytest.approx(9.0 + 1.5, abs=1e-12)


@pytest.mark.parametrize("breakage, expected", [
    ("directory", "RAPL: cannot read {root}/intel-rapl:0/energy_uj"),
    ("text", "RAPL: {root}/intel-rapl:0/energy_uj does not hold an integer"),
    ("no range", "RAPL: cannot read {root}/intel-rapl:0/max_energy_range_uj"),
    ("no zone", "RAPL: no intel-rapl:* zone under {root}"),
    ("no root", "RAPL: {root}/absent does not exist"),
])
def test_rapl_that_cannot_be_read_gives_the_reason(tmp_path, breakage, expected):
    write_zone(tmp_path, "intel-rapl:0", "package-0", 1_000)
    energy = tmp_path / "intel-rapl:0" / "energy_uj"
    root = str(tmp_path)
    if breakage == "directory":               # unreadable even for root (chmod 000 is not)
        energy.unlink()
        energy.mkdir()
    elif breakage == "text":
        energy.write_text("n/a\n")
    elif breakage == "no range":
        (tmp_path / "intel-rapl:0" / "max_energy_range_uj").unlink()
    elif breakage == "no zone":
        (tmp_path / "intel-rapl:0").rename(tmp_path / "other:0")
    else:
        root = str(tmp_path / "absent")
    m = Meter("rapl", rapl_root=root, clock=FakeClock(tick=1.0))
    reason = expected.format(root=str(tmp_path))
    assert not m.energy_available and m.backend == "none"
    assert m.unavailable_reason.startswith("no energy counter: " + reason), m.unavailable_reason
    with m.window("w") as w:
        pass
    assert w.measurement.joules is None and w.measurement.seconds == 1.0
    assert w.measurement.reason == m.unavailable_reason
    with pytest.raises(EnergyUnavailable, match="RAPL: "):
        Meter("rapl", rapl_root=root, require=True)


# ----------------------------------------------------------------------------------------------
# NVML

def test_nvml_reads_the_total_energy_counter_read_only(no_visible_devices):
    counter = [10_000_000]
    nvml = FakeNvml(energy_mj=lambda: counter[0])
    clock = FakeClock()
    m = Meter("auto", device_index=1, nvml=nvml, clock=clock)
    assert m.backend == "nvml" and m.energy_available
    assert "total-energy counter" in m.method and m.domains == ("GPU 1: Fake V100",)
    m.begin_window("fwd")
    counter[0] += 1234
    clock.t = 0.5
    r = m.end_window("fwd")
    assert r.joules == pytest.approx(1.234) and r.seconds == 0.5 and r.backend == "nvml"
    m.close()
    m.close()
    assert nvml.inits == 0 and nvml.calls.count("nvmlShutdown") == 1
    assert not any("Set" in c for c in nvml.calls)


def test_nvml_without_a_counter_integrates_sampled_power(no_visible_devices):
    clock = FakeClock(t=0.0)
    # power linear in time: the trapezoid rule is exact wherever the sampler thread reads it
    nvml = FakeNvml(power_mw=lambda: 1000.0 * (100.0 + 10.0 * clock.seen()))
    with Meter("nvml", nvml=nvml, clock=clock, sample_interval_s=0.001) as m:
        assert m.energy_available and "power sampling every 0.001 s" in m.method
        assert "Not Supported" in m.method
        clock.t = 1.0
        m.begin_window("w")
        clock.t = 3.0
        r = m.end_window("w")
    assert r.joules == pytest.approx(100 * 2 + 5 * (9 - 1), rel=1e-9)    # integral of 100 + 10 t on [1, 3]
    assert nvml.inits == 0 and not any("Set" in c for c in nvml.calls)


def test_power_integrator_is_the_trapezoid_rule():
    clock, watts = FakeClock(), [10.0]
    p = PowerIntegrator(lambda: watts[0], clock, interval_s=1.0, thread=False)
    clock.t, watts[0] = 1.0, 20.0
    p.sample()                                  # (10 + 20) / 2 * 1
    clock.t = 3.0
    assert p.joules() == pytest.approx(15.0 + 40.0)


def test_nvml_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    m = Meter("nvml", device_index=0, nvml=FakeNvml(energy_mj=lambda: 0))
    assert m.domains == ("GPU 1: Fake V100",)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234abcd")
    nvml = FakeNvml(energy_mj=lambda: 0)
    assert Meter("nvml", device_index=0, nvml=nvml).domains == ("GPU GPU-1234abcd: Fake V100",)
    assert "nvmlDeviceGetHandleByUUID" in nvml.calls
    m = Meter("nvml", device_index=1, nvml=FakeNvml(energy_mj=lambda: 0))
    assert "CUDA device 1 is not among CUDA_VISIBLE_DEVICES=GPU-1234abcd" in m.unavailable_reason


def test_nvml_that_cannot_read_gives_the_reason(no_visible_devices, tmp_path):
    absent = str(tmp_path / "absent")
    m = Meter("auto", nvml=FakeNvml(init_error="Driver Not Loaded"), rapl_root=absent, device_index=0)
    assert m.unavailable_reason == (f"no energy counter: NVML: nvmlInit failed (Driver Not Loaded); "
                                    f"RAPL: {absent} does not exist")
    nvml = FakeNvml()
    m = Meter("nvml", nvml=nvml, device_index=0)
    assert "NVML: GPU 0 (Fake V100) has neither the total-energy counter (Not Supported) nor a power reading" \
        in m.unavailable_reason
    assert nvml.inits == 0                      # released again
    m = Meter("nvml", nvml=FakeNvml(energy_mj=lambda: 0, gpus=1), device_index=3)
    assert "NVML: no GPU 3 (Invalid Argument)" in m.unavailable_reason


def test_the_real_pynvml_is_used_read_only_and_explains_itself():
    pytest.importorskip("pynvml")
    m = Meter("nvml")
    try:
        if m.energy_available:                  # a machine with an NVIDIA driver
            assert m.backend == "nvml" and m.domains
        else:
            assert m.unavailable_reason.startswith("no energy counter: NVML: "), m.unavailable_reason
    finally:
        m.close()


# ----------------------------------------------------------------------------------------------
# none, windows, totals, bad input

def test_without_a_counter_time_is_measured_and_energy_is_none():
    clock = FakeClock()
    m = Meter("none", clock=clock)
    assert not m.energy_available and m.backend == "none"
    assert m.unavailable_reason == "no energy counter: backend='none' was asked for"
    m.begin_window("epoch")
    clock.t = 4.0
    r = m.end_window("epoch")
    assert (r.seconds, r.joules, r.watts) == (4.0, None, None)
    assert m.totals()["epoch"].joules is None
    assert m.describe() == {"backend": "none", "method": "none (time only)", "domains": [],
                            "energy_available": False, "reason": m.unavailable_reason}


def test_windows_nest_switch_and_add_up(tmp_path):
    write_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    clock = FakeClock()
    m = Meter("rapl", rapl_root=str(tmp_path), clock=clock)
    joules = [0]

    def advance(seconds, uj):
        clock.t += seconds
        joules[0] += uj
        set_energy(tmp_path, "intel-rapl:0", joules[0])

    m.begin_window("epoch")
    for _ in range(2):
        m.begin_window("fwd")
        advance(1.0, 1_000_000)
        m.switch_window("fwd", "bwd")
        advance(2.0, 3_000_000)
        assert m.open_windows == ("epoch", "bwd")
        m.end_window("bwd")
        advance(0.5, 0)
    with m.window("eval") as w:
        advance(1.0, 2_000_000)
    assert w.measurement.seconds == 1.0 and w.measurement.joules == pytest.approx(2.0)
    epoch = m.end_window("epoch")
    assert epoch.seconds == 8.0 and epoch.joules == pytest.approx(10.0)
    t = m.totals()
    assert (t["fwd"].count, t["fwd"].seconds, t["fwd"].joules) == (2, 2.0, pytest.approx(2.0))
    assert (t["bwd"].count, t["bwd"].seconds, t["bwd"].joules) == (2, 4.0, pytest.approx(6.0))
    assert t["epoch"].count == 1 and set(t) == {"epoch", "fwd", "bwd", "eval"}
    with pytest.raises(RuntimeError, match="boom"):
        with m.window("broken"):
            raise RuntimeError("boom")
    assert "broken" not in m.totals() and m.open_windows == ()
    m.reset_totals()
    assert m.totals() == {}


@pytest.mark.parametrize("calls, message", [
    ([("end_window", "fwd")], "Meter.end_window: window 'fwd' was never begun"),
    ([("begin_window", "fwd"), ("end_window", "fwd"), ("end_window", "fwd")],
     "Meter.end_window: window 'fwd' already ended"),
    ([("begin_window", "fwd"), ("begin_window", "fwd")], "Meter.begin_window: window 'fwd' is already open"),
    ([("cancel_window", "fwd")], "Meter.cancel_window: window 'fwd' was never begun"),
    ([("begin_window", "a"), ("begin_window", "fwd"), ("switch_window", "a", "fwd")],
     "Meter.switch_window: window 'fwd' is already open"),
    ([("switch_window", "fwd", "b")], "Meter.switch_window: window 'fwd' was never begun"),
    ([("begin_window", "")], "Meter.begin_window: the window name must be a non-empty string"),
    ([("end_window", 3)], "Meter.end_window: the window name must be a non-empty string, got 3"),
])
def test_bad_window_calls_name_the_window(calls, message):
    m = Meter("none")
    with pytest.raises(ValueError) as e:
        for name, *args in calls:
            getattr(m, name)(*args)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="gpu"), "Meter: backend must be one of 'auto', 'nvml', 'rapl', 'none', got 'gpu'"),
    (dict(device_index=-1), "Meter: device_index must be None or an integer >= 0, got -1"),
    (dict(sample_interval_s=0), "Meter: sample_interval_s must be a positive number of seconds, got 0"),
    (dict(backend="none", require=True), "Meter: require=True asks for an energy counter"),
])
def test_bad_meter_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError) as e:
        Meter(**kwargs)
    assert str(e.value).startswith(message)


def test_a_closed_meter_refuses_to_read():
    m = Meter("none")
    m.close()
    with pytest.raises(ValueError, match="Meter.read: the meter is closed"):
        m.begin_window("w")


# ----------------------------------------------------------------------------------------------
# the plug-in

def _tiny_trainer(plugins, trainer_cls=Trainer, **kw):
    from pyoptim.data import DeviceLoader
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (64,), generator=g)
    train = DeviceLoader(x, y, 16, shuffle=True, augment=False, seed=0)
    test = DeviceLoader(x[:32], y[:32], 32, shuffle=False, augment=False)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return trainer_cls(model, opt, train, eval_data=test, plugins=plugins, max_epochs=2, log_every=0,
                       progress=False, **kw)


def _fake_gpu_meter():
    """A meter on a fake NVML counter that runs at 50 W of the real clock: real joules."""
    import time
    nvml = FakeNvml(energy_mj=lambda: int(50.0 * 1e3 * time.perf_counter()))
    return Meter("nvml", device_index=0, nvml=nvml)


def _check_rows(history, phases, backend):
    """Every row has the columns; the measured phases are disjoint windows inside the epoch."""
    joules = backend != "none"
    for row in history:
        assert row["energy_backend"] == backend
        assert (row["energy_j"] is not None) == joules
        measured = [row[f"energy_{p}_s"] for p in phases]
        assert all(s is not None and s >= 0 for s in measured)
        assert sum(measured) <= row["energy_s"] + 1e-9
        assert row["energy_other_s"] == pytest.approx(row["energy_s"] - sum(measured), abs=1e-9)
        for p in set(PHASES) - set(phases):
            assert row[f"energy_{p}_s"] is None and row[f"energy_{p}_j"] is None
        if joules:
            pj = [row[f"energy_{p}_j"] for p in phases]
            assert all(j >= 0 for j in pj) and sum(pj) <= row["energy_j"] + 1e-9


def test_plugin_with_prunetrain_gives_every_phase_per_epoch(no_visible_devices):
    from pyoptim.prune import PruneTrain
    energy = EnergyPlugin(meter=_fake_gpu_meter())
    prune = PruneTrain(lpr=0.2, interval=1, threshold=1e9, grow_batch=False)
    tr = _tiny_trainer(energy.around(prune))
    hist = tr.fit()
    _check_rows(hist, PHASES, "nvml")
    s = energy.summary()
    assert s["backend"] == "nvml" and s["phases"] == list(PHASES) and len(s["per_epoch"]) == 2
    first = s["per_epoch"][0]["phases"]
    steps = hist[0]["step"]
    assert first["forward"]["count"] == first["backward"]["count"] == first["optimizer"]["count"] == steps
    assert first["reconfigure"]["count"] == 1 and len(prune.events) == 2
    assert s["total"]["joules"] == pytest.approx(sum(r["energy_j"] for r in hist))
    assert not any("forward hook" in n for n in s["notes"])
    json.dumps(s)                                # the report's section is plain data


class _Recording(Trainer):
    """Records the trainer members read from pyoptim/energy (the plug-in's code)."""
    outside = None

    def __getattribute__(self, name):
        rec = object.__getattribute__(self, "outside")
        if rec is not None and not name.startswith("__"):
            caller = sys._getframe(1).f_code.co_filename
            if os.sep + "energy" + os.sep in caller:
                rec.add(name)
        return object.__getattribute__(self, name)


class _no_pickle_warning:
    """The checkpoints pickle the model, forward hook included: no 'cannot be pickled' warning."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert not [w for w in self.caught if "pickled" in str(w.message)], [str(w.message) for w in self.caught]


def test_plugin_alone_uses_only_the_contract_and_leaves_the_method_phases_unmeasured(tmp_path):
    from pyoptim.train.plugin import TRAINER_CONTRACT
    energy = EnergyPlugin(meter=Meter("none"))
    tr = _tiny_trainer([energy], trainer_cls=_Recording, checkpoint_dir=str(tmp_path / "ckpt"))
    tr.outside = set()
    with _no_pickle_warning():
        hist = tr.fit()
    used, tr.outside = tr.outside, None
    assert used and used <= set(TRAINER_CONTRACT), used - set(TRAINER_CONTRACT)
    _check_rows(hist, ("forward", "backward", "optimizer"), "none")
    assert any("no end_marker" in n for n in energy.summary()["notes"])
    assert energy.meter.unavailable_reason in energy.summary()["reason"]
    assert tr.model._forward_hooks == {} and tr.optimizer._optimizer_step_pre_hooks == {}


def test_the_forward_hook_pickles_and_copies_as_a_no_op():
    energy = EnergyPlugin(meter=Meter("none"))
    tr = _tiny_trainer([energy])
    energy.on_fit_start(tr)
    copied = copy.deepcopy(tr.model)
    restored = pickle.loads(pickle.dumps(tr.model))
    x = torch.zeros(2, 1, 8, 8)
    for model in (copied, restored):
        assert len(model._forward_hooks) == 1
        model(x)                                   # the inert hook does nothing
    energy.on_fit_end(tr)


def test_the_forward_hook_fires_under_torch_compile():
    energy = EnergyPlugin(meter=Meter("none"))
    tr = _tiny_trainer([energy], compile={"backend": "eager"})     # dynamo traces, no code generation
    hist = tr.fit(max_epochs=1)
    assert energy.unsplit_steps == 0
    _check_rows(hist, ("forward", "backward", "optimizer"), "none")


def test_phases_false_measures_epochs_and_reconfigurations_only():
    from pyoptim.prune import PruneTrain
    energy = EnergyPlugin(meter=Meter("none"), phases=False)
    tr = _tiny_trainer(energy.around(PruneTrain(lpr=0.2, interval=1, threshold=1e9, grow_batch=False)))
    hist = tr.fit()
    _check_rows(hist, ("reconfigure",), "none")
    assert all(r["energy_reconfigure_s"] > 0 for r in hist)
    assert tr.model._forward_hooks == {}


def test_a_fit_stopped_inside_an_epoch_continues_its_record(no_visible_devices):
    energy = EnergyPlugin(meter=Meter("none", clock=FakeClock(tick=1.0)))
    tr = _tiny_trainer([energy])
    tr.fit(max_steps=2)                          # half of epoch 0
    s = energy.summary()
    assert s["per_epoch"] == [] and s["unfinished"]["phases"]["forward"]["count"] == 2
    assert s["total"]["seconds"] == s["unfinished"]["seconds"] > 0
    state = copy.deepcopy(energy.state_dict())
    assert state["epochs"] == [] and state["current"]["forward"][0] == 2
    again = EnergyPlugin(meter=Meter("none", clock=FakeClock(tick=1.0)))
    again.load_state_dict(state)
    assert again.state_dict() == state
    hist = tr.fit(max_epochs=1)
    assert len(hist) == 1 and energy.epochs[0]["phases"]["forward"]["count"] == 4
    _check_rows(hist, ("forward", "backward", "optimizer"), "none")


def test_a_step_outside_fit_is_not_measured():
    energy = EnergyPlugin()
    tr = _tiny_trainer([energy])
    x, y = next(iter(tr.train_data))
    tr.step(x, y)
    assert energy.meter is None and energy.epochs == [] and energy.state_dict()["current"] == {}


def test_the_end_marker_must_follow_its_plugin():
    energy = EnergyPlugin(meter=Meter("none"))
    with pytest.raises(ValueError, match="EnergyPlugin: its end_marker must come after it"):
        _tiny_trainer([energy.end_marker, energy]).fit()
    other = EnergyPlugin(meter=Meter("none"))
    with pytest.raises(ValueError, match="EnergyEndMarker: its EnergyPlugin is not in"):
        _tiny_trainer([other.end_marker]).fit()
    with pytest.raises(TypeError, match="EnergyPlugin: meter must be a pyoptim.energy.Meter"):
        EnergyPlugin(meter="nvml")


# ----------------------------------------------------------------------------------------------
# the command and the report

def test_train_energy_flag_end_to_end(tmp_path, capsys):
    from pyoptim import cli
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "resnet20", "--data", "synthetic", "--synthetic-samples", "64",
                   "--epochs", "2", "--interval", "1", "--threshold", "1e9", "--batch-size", "32", "--width", "0.25",
                   "--no-grow-batch", "--out", str(out), "--log-every", "0", "--device", "cpu", "--energy"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    en = report["energy"]
    assert en["phases"] == list(PHASES) and len(en["per_epoch"]) == 2
    assert en["energy_available"] or en["reason"].startswith("no energy counter: RAPL: ")
    _check_rows(report["history"], PHASES, en["backend"])
    assert all(r["energy_backend"] == en["backend"] for r in report["history"])
    assert (out / "report.png").stat().st_size > 10_000
    assert "\nenergy (" in capsys.readouterr().out


def test_bad_energy_option_is_refused_when_parsed(capsys, monkeypatch):
    from pyoptim import cli
    import pyoptim.cli.run as run
    monkeypatch.setattr(run, "_load_data", lambda *a: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "synthetic", "--energy", "joules"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "argument --energy: invalid choice: 'joules'" in err[0]


@pytest.mark.parametrize("available", [True, False])
def test_report_draws_the_energy_panel(tmp_path, available):
    pytest.importorskip("matplotlib")
    from pyoptim.report import draw_training, summary_line
    phases = {p: {"count": 4, "seconds": 0.5, "joules": 20.0 if available else None} for p in PHASES}
    phases["other"] = {"count": None, "seconds": 0.2, "joules": 5.0 if available else None}
    per_epoch = [{"epoch": e, "seconds": 2.7, "joules": 105.0 if available else None, "phases": phases}
                 for e in range(2)]
    energy = {"backend": "rapl" if available else "none", "method": "m", "domains": ["package-0 (intel-rapl:0)"],
              "energy_available": available,
              "reason": "" if available else "no energy counter: RAPL: /sys/class/powercap does not exist",
              "phases": list(PHASES), "per_epoch": per_epoch,
              "total": {"seconds": 5.4, "joules": 210.0 if available else None,
                        "phases": {p: {"seconds": 1.0, "joules": 40.0 if available else None}
                                   for p in list(PHASES) + ["other"]}}, "notes": []}
    report = {"config": {"model": "resnet20", "data": "synthetic", "method": "prunetrain"},
              "history": [{"epoch": e, "accuracy": 0.5, "eval_accuracy": 0.4} for e in range(2)],
              "train_flops_per_sample_initial": 1e6, "train_flops_per_sample": [9e5, 8e5],
              "layers_per_epoch": [{"a": 8}, {"a": 6}], "final": {"train_flops_per_sample": 8e5},
              "wall_s": 3.0, "energy": energy}
    path = draw_training(report, str(tmp_path / "report.png"))
    assert path and os.path.getsize(path) > 10_000
    line = summary_line(report)
    assert ("210.0 J" in line) if available else ("no energy counter: RAPL" in line)
