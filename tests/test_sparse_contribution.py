"""Contribution analysis (pyoptim.sparse.contribution) on a tiny synthetic task: no data set
needed. Fake fine-tune functions count calls and give known accuracies; one real tiny instance
checks that worker processes give what the serial run gives."""
import copy
import json

import pytest
import torch

from pyoptim.models import mobilenet_v2
from pyoptim.sparse import (Scheme, SearchSpace, SparseUpdateScheme, contribution, exact_search,
                            evolution_search, fuse_bn, memory_estimate, search_space)
from pyoptim.sparse.contribution import conv_positions, default_candidates, update_scheme
from pyoptim.sparse.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = ["features.18.0", "features.17.conv.0"]          # positions 1 and 4
RATIOS = [0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return mobilenet_v2(0.35, num_classes=5, in_channels=1).eval()


def synthetic_task(n_train=48, n_test=40, res=32, seed=0) -> Task:
    """Labels a function of the image (which quadrant is brightest), so a few steps learn."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        x = torch.randint(0, 60, (n, 1, res, res), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 5, (n,), generator=g)
        h = res // 2
        for i, c in enumerate(y.tolist()):
            if c < 4:
                r, q = divmod(c, 2)
                x[i, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
        return x, y

    (xt, yt), (xe, ye) = make(n_train), make(n_test)
    return Task("synthetic", (0, 1, 2, 3, 4), False, None, res, seed, xt, yt, xe, ye)


class Fake:
    """A fine-tune whose accuracy is a known function of the scheme; counts its calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, model, task, scheme, seed=0, **hyper):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls.append((scheme, seed, hyper))
        acc = 0.5 + 0.001 * seed
        if scheme is None:
            return acc
        return acc + 0.01 * len(scheme.bias_layers) + 0.1 * sum(scheme.weight_ratios.values())


def test_tables_have_the_right_keys_and_values(model):
    fake = Fake()
    tab = contribution(model, synthetic_task(), ks=[0, 2], candidates=CANDIDATES, ratios=RATIOS,
                       seeds=(0, 1), steps=7, finetune_fn=fake)
    assert tab.ks == [0, 1, 2, 4]                     # the references p_i are always measured
    assert tab.positions == {"features.18.0": 1, "features.17.conv.0": 4}
    assert tab.ratios == RATIOS and tab.seeds == [0, 1]
    assert len(fake.calls) == 2 * (4 + 2 * 3) and all(h["steps"] == 7 for _, _, h in fake.calls)
    for k in tab.ks:                                  # the mean over seeds 0 and 1 adds 0.0005
        assert tab.bias_gain[k] == pytest.approx(0.01 * k)
        assert tab.bias_accuracy[k] == pytest.approx(0.5005 + 0.01 * k)
    for layer in CANDIDATES:
        assert tab.weight_gain[layer] == pytest.approx([0.1 * r for r in RATIOS])
    again = type(tab).from_dict(json.loads(json.dumps(tab.to_dict())))
    assert again == tab
    assert conv_positions(model)["features.18.0"] == 1 and len(conv_positions(model)) == 52
    assert default_candidates(model)[:3] == ["features.18.0", "features.17.conv.6",
                                             "features.17.conv.0"]


def test_resume_skips_finished_entries(model, tmp_path):
    cache, task = tmp_path / "c.json", synthetic_task()
    kw = dict(candidates=CANDIDATES, ratios=RATIOS, cache=cache)
    with pytest.raises(RuntimeError, match="interrupted"):
        contribution(model, task, finetune_fn=Fake(fail_after=4), **kw)
    assert len(json.loads(cache.read_text())["entries"]) == 4     # written as each finished
    rest = Fake()
    first = contribution(model, task, finetune_fn=rest, **kw)
    assert len(rest.calls) == 5 + 6 - 4               # ks 0..4 and 2 x 3 weights, 4 cached
    none = Fake()
    assert contribution(model, task, finetune_fn=none, **kw) == first and not none.calls
    more = Fake()                                     # a new ratio: only its entries run
    contribution(model, task, finetune_fn=more, **{**kw, "ratios": [0.125] + RATIOS})
    assert len(more.calls) == 2 and all(r == {CANDIDATES[0]: 0.125} or r == {CANDIDATES[1]: 0.125}
                                        for r in (s.weight_ratios for s, _, _ in more.calls))
    assert not list(tmp_path.glob(".*.tmp"))          # the atomic writes left nothing behind


def test_a_cache_for_another_config_is_refused(model, tmp_path):
    cache, task = tmp_path / "c.json", synthetic_task()
    contribution(model, task, candidates=CANDIDATES[:1], steps=10, cache=cache, finetune_fn=Fake())
    with pytest.raises(ValueError, match=r"steps 10 != 20") as exc:
        contribution(model, task, candidates=CANDIDATES[:1], steps=20, cache=cache, finetune_fn=Fake())
    assert "\n" not in str(exc.value)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier[1].bias.add_(1.0)
    with pytest.raises(ValueError, match="model '"):
        contribution(other, task, candidates=CANDIDATES[:1], steps=10, cache=cache, finetune_fn=Fake())
    with pytest.raises(ValueError, match="task.data_sha256"):
        contribution(model, synthetic_task(seed=1), candidates=CANDIDATES[:1], steps=10,
                     cache=cache, finetune_fn=Fake())


def test_bad_arguments(model):
    task = synthetic_task()
    with pytest.raises(ValueError, match="workers"):
        contribution(model, task, candidates=CANDIDATES, workers=0, finetune_fn=Fake())
    with pytest.raises(ValueError, match="ratios"):
        contribution(model, task, candidates=CANDIDATES, ratios=[0.5, 1.5], finetune_fn=Fake())
    with pytest.raises(ValueError, match="classifier.1"):
        contribution(model, task, candidates=["classifier.1"], finetune_fn=Fake())


FINGERPRINT = """
from pyoptim.sparse.tasks import finetune


def fingerprint(model, task, scheme, seed=0, **hyper):
    acc, tuned = finetune(model, task, scheme, seed=seed, return_model=True, **hyper)
    return acc + sum(float(p.detach().double().sum()) for p in tuned.parameters() if p.requires_grad)
"""


def test_workers_give_what_the_serial_run_gives(model, tmp_path, monkeypatch):
    # a real fine-tune returning a number every trained bit moves; spawned workers import it by
    # name, and pytest's importlib mode makes this test module unimportable there: a module file
    (tmp_path / "contrib_fingerprint.py").write_text(FINGERPRINT)
    monkeypatch.syspath_prepend(str(tmp_path))
    from contrib_fingerprint import fingerprint

    task = synthetic_task(n_train=24, n_test=16)
    kw = dict(ks=[0], candidates=["features.18.0", "features.17.conv.6"], ratios=[0.5, 1.0],
              seeds=(0, 1), steps=3, batch_size=8, lr=0.2, finetune_fn=fingerprint)
    serial = contribution(model, task, workers=1, **kw)
    parallel = contribution(model, task, workers=2, **kw)
    assert serial.bias_accuracy == parallel.bias_accuracy
    assert serial.weight_accuracy == parallel.weight_accuracy
    assert len({v for row in serial.weight_accuracy.values() for v in row}) == 4


def test_search_space_is_valid_and_its_memory_matches_memory_estimate(model):
    fake = Fake()
    cands = default_candidates(model, window=8)
    tab = contribution(model, synthetic_task(), candidates=cands, ratios=RATIOS, finetune_fn=fake)
    shape, batch = (1, 32, 32), 4
    space = search_space(model, tab, shape, batch)
    assert isinstance(space, SearchSpace) and space.max_k == 8
    assert space.positions == {c: conv_positions(model)[c] for c in cands}
    assert SearchSpace.from_json(space.to_json()) == space
    fused = fuse_bn(copy.deepcopy(model))
    full = Scheme(8, {c: 1.0 for c in cands})
    for scheme in (Scheme(0), Scheme(3), Scheme(5, {"features.18.0": 0.25, "features.16.conv.6": 1.0}),
                   Scheme(8, {"features.17.conv.6": 0.5, "features.15.conv.6": 0.25}), full):
        plan = update_scheme(fused, scheme.k, scheme.ratios) or SparseUpdateScheme()
        true = memory_estimate(fused, plan, shape, batch)["total"]
        assert space.memory(scheme) == pytest.approx(true, rel=0.01), scheme
    budget = (space.min_memory() + space.memory(full)) / 2
    best = exact_search(space, budget)
    evo = evolution_search(space, budget, evaluations=200, seed=0, population=20)
    assert space.feasible(best.scheme, budget) and evo.score <= best.score + 1e-12
