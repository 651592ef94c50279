"""pyoptim.sparse.search: the exact DP against brute force, the evolution and random searches
(feasible, seeded, bounded, with their curves), bad input and the JSON round trips."""
import itertools
import json
import math
import random
import statistics

import pytest

from pyoptim.sparse import (Scheme, SearchResult, SearchSpace, evaluations_to_reach,
                            evolution_search, exact_search, random_search)

RATIOS = [1 / 8, 1 / 4, 1 / 2, 1.0]


def make_space(seed, n_layers, ratios=RATIOS, max_k=None, integer=False):
    """Fresh random tables: weight memory ~ layer size x ratio, concave gains with noise (some
    negative), increasing bias memory; integer memories (bytes) give many equal sums."""
    rng = random.Random(seed)
    max_k = n_layers + 1 if max_k is None else max_k
    names = [f"features.{i}.conv" for i in range(n_layers)]
    positions = dict(zip(names, rng.sample(range(1, max_k + 1), n_layers)))
    weight_memory, weight_gain = {}, {}
    for name in names:
        size, contrib = rng.uniform(1, 10), rng.uniform(0, 3)
        mem = [size * r * rng.uniform(0.8, 1.2) for r in ratios]
        weight_memory[name] = [float(round(4 * m)) for m in mem] if integer else mem
        weight_gain[name] = [contrib * math.sqrt(r) + rng.uniform(-0.3, 0.2) for r in ratios]
    bias_memory, bias_gain = [0.0], [0.0]
    for _ in range(max_k):
        step = rng.randint(1, 3) if integer else rng.uniform(0.05, 1)
        bias_memory.append(bias_memory[-1] + step)
        bias_gain.append(bias_gain[-1] + rng.uniform(-0.1, 0.5))
    return SearchSpace(list(ratios), bias_gain, bias_memory, positions, weight_gain, weight_memory)


def all_schemes(space):
    """(score, memory, scheme) of every scheme in the window: every k, every ratio (0 included)
    for every layer, those outside the window filtered by ``in_window``."""
    names, out = list(space.positions), []
    for k in range(space.max_k + 1):
        for levels in itertools.product([0.0] + space.ratios, repeat=len(names)):
            scheme = Scheme(k, dict(zip(names, levels)))
            if space.in_window(scheme):
                out.append((space.score(scheme), space.memory(scheme), scheme))
    return out


def budgets(space, schemes):
    mems = sorted({m for _, m, _ in schemes})
    return [space.min_memory(), mems[1], mems[len(mems) // 20], mems[len(mems) // 4],
            mems[len(mems) // 2], mems[-1], math.inf]


def check_exact(space, schemes, budget, grid=None):
    best = max(s for s, m, _ in schemes if m <= budget)
    r = exact_search(space, budget, grid=grid)
    assert space.feasible(r.scheme, budget)
    assert r.score == space.score(r.scheme) and r.memory == space.memory(r.scheme)
    if grid is None:
        assert r.score == best and r.method == "exact"   # bit for bit: same sums, same order
    else:
        assert r.score <= best and r.method == "grid-dp"
    return r


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_equals_brute_force(seed):
    space = make_space(seed, n_layers=4, max_k=5)
    schemes = all_schemes(space)
    for budget in budgets(space, schemes):
        check_exact(space, schemes, budget)
        check_exact(space, schemes, budget, grid=0.7)


def test_exact_equals_brute_force_fine_levels():
    space = make_space(3, n_layers=3, ratios=[j / 16 for j in range(1, 17)], max_k=4)
    schemes = all_schemes(space)
    for budget in budgets(space, schemes):
        check_exact(space, schemes, budget)


@pytest.mark.parametrize("seed", [4, 5])
def test_exact_equals_brute_force_integer_memories(seed):
    space = make_space(seed, n_layers=4, integer=True)
    schemes = all_schemes(space)
    for budget in sorted({m for _, m, _ in schemes})[::7]:   # budgets exactly at some sums
        check_exact(space, schemes, budget)
        # integer memories on a grid of 1: the grid DP is exact too
        assert exact_search(space, budget, grid=1).score == exact_search(space, budget).score


@pytest.mark.parametrize("search", [evolution_search, random_search])
def test_heuristics_feasible_seeded_with_curve(search):
    space = make_space(7, n_layers=5, max_k=6)
    schemes = all_schemes(space)
    kw = {"population": 20} if search is evolution_search else {}
    for budget in budgets(space, schemes)[:-1]:
        optimum = exact_search(space, budget).score
        r = search(space, budget, 150, seed=3, **kw)
        assert space.feasible(r.scheme, budget) and r.memory <= budget
        assert r.score == space.score(r.scheme) and r.memory == space.memory(r.scheme)
        assert r.evaluations == len(r.curve) == 150 and r.seed == 3
        assert all(a <= b for a, b in zip(r.curve, r.curve[1:])) and r.curve[-1] == r.score
        assert r.score <= optimum
        assert search(space, budget, 150, seed=3, **kw).to_dict() == r.to_dict()
    medium = make_space(11, n_layers=12, max_k=12)
    budget = 0.3 * medium.memory(Scheme(12, {n: 1.0 for n in medium.positions}))
    curves = [search(medium, budget, 200, seed=s, **kw).curve for s in range(3)]
    assert curves[0] != curves[1] and curves[1] != curves[2]


@pytest.mark.parametrize("instance", [20, 21, 22])
def test_evolution_beats_random_search(instance):
    space = make_space(instance, n_layers=12, max_k=12)
    budget = 0.3 * space.memory(Scheme(12, {n: 1.0 for n in space.positions}))
    optimum = exact_search(space, budget).score
    evo = [evolution_search(space, budget, 1000, seed=s).score for s in range(5)]
    rand = [random_search(space, budget, 1000, seed=s).score for s in range(5)]
    assert max(evo + rand) <= optimum
    # evolution closes at least a quarter of random search's mean gap to the optimum (it closes
    # about half or more on such instances)
    gap_evo, gap_rand = optimum - statistics.mean(evo), optimum - statistics.mean(rand)
    assert gap_evo < 0.75 * gap_rand


def test_budget_at_min_memory_only_the_empty_scheme():
    space = make_space(8, n_layers=6)
    budget = space.min_memory()
    empty = Scheme(0, {})
    for r in (evolution_search(space, budget, 300, seed=0, population=30),
              random_search(space, budget, 300, seed=0), exact_search(space, budget)):
        assert r.scheme == empty and r.score == space.bias_gain[0] and r.memory == budget
    assert len(evolution_search(space, budget, 300, seed=0).curve) == 300


def test_no_repair_steps_falls_back_and_stops():
    space = make_space(9, n_layers=8, max_k=8)
    budget = space.min_memory() + 0.5 * (space.bias_memory[-1] - space.min_memory())
    for r in (evolution_search(space, budget, 400, seed=1, population=20, max_retries=0),
              random_search(space, budget, 50, seed=1)):
        assert space.feasible(r.scheme, budget) and len(r.curve) == r.evaluations


def test_fewer_evaluations_than_population():
    space = make_space(10, n_layers=5)
    r = evolution_search(space, space.bias_memory[-1], 7, seed=0)
    assert len(r.curve) == r.evaluations == 7


def test_evaluations_to_reach():
    curve = [1.0, 1.0, 2.5, 3.0]
    assert evaluations_to_reach(curve, 1.0) == 1
    assert evaluations_to_reach(curve, 2.0) == 3
    assert evaluations_to_reach(curve, 3.0) == 4
    assert evaluations_to_reach(curve, 3.5) is None
    assert evaluations_to_reach([], 0.0) is None


def tables(**change):
    t = {"ratios": [0.25, 0.5, 1.0], "bias_gain": [0.0, 1.0, 1.5], "bias_memory": [1.0, 2.0, 3.0],
         "positions": {"a": 1, "b": 2}, "weight_gain": {"a": [0.1, 0.2, 0.3], "b": [0.2, 0.3, 0.4]},
         "weight_memory": {"a": [1.0, 2.0, 4.0], "b": [2.0, 4.0, 8.0]}}
    t.update(change)
    return t


@pytest.mark.parametrize("change, name", [
    ({"ratios": [0.25, 0.5, 1.5]}, "ratios"),
    ({"ratios": [0.0, 0.5, 1.0]}, "ratios"),
    ({"ratios": [0.5, 0.25, 1.0]}, "ratios"),
    ({"bias_memory": [1.0, 2.0]}, "bias_memory"),
    ({"bias_memory": [1.0, -2.0, 3.0]}, "bias_memory"),
    ({"bias_memory": [1.0, 3.0, 2.0]}, "bias_memory"),
    ({"bias_gain": [0.0, math.nan, 1.0]}, "bias_gain"),
    ({"weight_gain": {"a": [0.1, 0.2], "b": [0.2, 0.3, 0.4]}}, "weight_gain['a']"),
    ({"weight_gain": {"a": [0.1, math.nan, 0.3], "b": [0.2, 0.3, 0.4]}}, "weight_gain['a']"),
    ({"weight_memory": {"a": [1.0, -2.0, 4.0], "b": [2.0, 4.0, 8.0]}}, "weight_memory['a']"),
    ({"weight_memory": {"a": [1.0, 2.0, 4.0]}}, "weight_memory"),
    ({"positions": {"a": 1, "b": 3}}, "positions['b']"),
    ({"positions": {"a": 1, "b": 1}}, "positions"),
])
def test_bad_tables_name_the_argument(change, name):
    with pytest.raises(ValueError, match=f"SearchSpace.{name}".replace("[", r"\[")):
        SearchSpace(**tables(**change))


def test_bad_search_arguments_name_the_argument():
    space = SearchSpace(**tables())
    for search in (evolution_search, random_search, lambda s, b, n: exact_search(s, b)):
        with pytest.raises(ValueError, match=r"budget 0\.5 is below .*min_memory\(\) = 1\.0"):
            search(space, 0.5, 10)
    for search in (evolution_search, random_search):
        with pytest.raises(ValueError, match="evaluations"):
            search(space, 5.0, 0)
    with pytest.raises(ValueError, match="population"):
        evolution_search(space, 5.0, 10, population=1)
    with pytest.raises(ValueError, match="max_retries"):
        evolution_search(space, 5.0, 10, max_retries=-1)
    with pytest.raises(ValueError, match="grid"):
        exact_search(space, 5.0, grid=0)
    with pytest.raises(ValueError, match="unknown layer 'c'"):
        space.score(Scheme(2, {"c": 0.5}))
    with pytest.raises(ValueError, match="not one of the levels"):
        space.memory(Scheme(2, {"a": 0.3}))
    with pytest.raises(ValueError, match="Scheme.k"):
        Scheme(-1, {})


@pytest.mark.parametrize("search", [evolution_search, random_search])
def test_heuristics_reach_the_optimum_of_a_tiny_space(search):
    space = SearchSpace(**tables())
    schemes = all_schemes(space)
    for budget in sorted({m for _, m, _ in schemes}):
        optimum = exact_search(space, budget).score
        r = search(space, budget, 200, seed=0)
        assert evaluations_to_reach(r.curve, optimum) is not None and r.score == optimum


def test_sampler_operators():
    from pyoptim.sparse.search import _Sampler
    space = make_space(13, n_layers=6, max_k=6)
    budget = space.min_memory() + 3.0
    sampler = _Sampler(space, budget, random.Random(0), None)
    a, b = [6, 1, 2, 3, 4, 1, 2], [3, 4, 3, 2, 1, 0, 0]
    for _ in range(20):
        child = sampler.crossover(a, b)
        assert all(c in (x, y) for c, x, y in zip(child, a, b))
        assert sampler.mutate(a, 0.0) == a
        genes = sampler.mutate(a, 1.0)
        assert 0 <= genes[0] <= 6 and all(0 <= g <= 4 for g in genes[1:])
        fixed = sampler.repair(genes)
        assert space.feasible(space._scheme(sampler.express(fixed)), budget)
    assert _Sampler(space, budget, random.Random(0), 0).repair(a) is None   # over budget, no steps


def test_latent_levels_outside_the_window_are_kept_and_come_back():
    from pyoptim.sparse.search import _Sampler
    space = make_space(13, n_layers=6, max_k=6)
    sampler = _Sampler(space, math.inf, random.Random(0), None)
    order = space._order
    genes = [2] + [3] * len(order)
    shown = sampler.express(genes)
    assert shown[1:] == [3 if space.positions[n] <= 2 else 0 for n in order]
    assert sampler.repair(genes) == genes                  # feasible: the latent levels stay
    grown = [6] + genes[1:]
    assert sampler.express(grown) == grown                 # a larger window brings them back
    # over budget: the weights in the window are trimmed first, k only when none is left
    tight = _Sampler(space, space.bias_memory[6] + 1e-9, random.Random(1), None)
    fixed = tight.repair(grown)
    assert fixed[0] == 6 and all(g == 0 for g in tight.express(fixed)[1:])
    assert space._gene_memory(tight.express(fixed)) <= space.bias_memory[6] + 1e-9
    smaller = _Sampler(space, space.bias_memory[3], random.Random(1), None).repair(grown)
    assert smaller[0] == 3 and space._gene_memory(sampler.express(smaller)) <= space.bias_memory[3]
    assert smaller[1:] == [0] * len(order)                 # every weight went before k did


def test_redraws_avoid_scoring_a_scheme_twice():
    space = make_space(14, n_layers=4, max_k=5)
    budget = space.min_memory() + 0.5 * (space.memory(Scheme(5, {n: 1.0 for n in space.positions}))
                                         - space.min_memory())
    n_feasible = sum(space.feasible(s, budget) for _, _, s in all_schemes(space))
    assert n_feasible > 60
    for search, kw in ((random_search, {}), (evolution_search, {"population": 20})):
        def distinct(redraws):
            from pyoptim.sparse.search import _Sampler, _Tracker
            seen = []
            orig = _Tracker.score
            def spy(self, genes):
                seen.append(tuple(genes))
                return orig(self, genes)
            _Tracker.score = spy
            try:
                r = search(space, budget, 60, seed=2, max_redraws=redraws, **kw)
            finally:
                _Tracker.score = orig
            assert len(seen) == r.evaluations == 60
            return len(set(seen))
        assert distinct(20) > distinct(0)
        # with many redraws nearly every scheme is new (a converged population may still repeat)
        assert distinct(50) >= (60 if search is random_search else 57)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_redraws"):
            random_search(space, budget, 10, max_redraws=bad)
        with pytest.raises(ValueError, match="max_redraws"):
            evolution_search(space, budget, 10, max_redraws=bad)


@pytest.mark.parametrize("instance", [20, 23])
def test_evolution_needs_5x_fewer_evaluations_than_random_search(instance):
    """The issue's goal on synthetic spaces shaped like MobileNetV2's (12 candidates, 17 windows,
    8 levels): evolution's median evaluations to 99% of the optimum at least 5x below random
    search's (random search mostly never gets there within 5x evolution's budget). Before the
    latent levels and the weights-first repair evolution stalled on such spaces at a window too
    small (k = 11 or 13 where the optimum has 13 or 16) in most seeds."""
    from pyoptim.sparse.compare import compare_searches
    space = make_space(instance, n_layers=12, max_k=16, ratios=[j / 8 for j in range(1, 9)])
    budget = 0.2 * space.memory(Scheme(16, {n: 1.0 for n in space.positions}))
    res = compare_searches(space, budget, 2000, seeds=[0, 1, 2, 3, 4], random_evaluations=10000)
    assert res["evolution"]["median_to_target"] is not None
    assert res["speedup_at_least"] >= 5


def test_window_and_model():
    space = SearchSpace(**tables())
    assert space.min_memory() == 1.0
    inside, outside = Scheme(1, {"a": 0.5}), Scheme(1, {"b": 0.5})
    assert space.score(inside) == 1.0 + 0.2 and space.memory(inside) == 2.0 + 2.0
    assert space.feasible(inside, 4.0) and not space.feasible(inside, 3.9)
    assert not space.in_window(outside) and not space.feasible(outside, 100.0)
    assert Scheme(2, {"a": 0.0, "b": 1.0}) == Scheme(2, {"b": 1.0})


def test_json_round_trips():
    space = make_space(12, n_layers=5)
    assert SearchSpace.from_json(space.to_json()) == space
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    scheme = Scheme(3, {"features.1.conv": 0.25})
    assert Scheme.from_json(scheme.to_json()) == scheme
    budget = 0.4 * space.bias_memory[-1] + space.min_memory()
    for r in (evolution_search(space, budget, 50, seed=2), exact_search(space, budget)):
        back = SearchResult.from_json(r.to_json())
        assert back == r and space.score(back.scheme) == r.score
    with pytest.raises(ValueError, match="from_dict"):
        SearchSpace.from_dict({"ratios": [1.0]})


def test_restrict_to_coarser_levels():
    fine = [j / 8 for j in range(1, 9)]
    space = make_space(15, n_layers=5, ratios=fine, max_k=6)
    coarse = space.restrict([1.0, 0.125, 0.25, 0.5])
    assert coarse.ratios == [0.125, 0.25, 0.5, 1.0]
    for name in space.positions:
        assert coarse.weight_gain[name] == [space.weight_gain[name][j] for j in (0, 1, 3, 7)]
        assert coarse.weight_memory[name] == [space.weight_memory[name][j] for j in (0, 1, 3, 7)]
    s = Scheme(6, {n: 0.5 for n in space.positions})
    assert coarse.score(s) == space.score(s) and coarse.memory(s) == space.memory(s)
    top = space.memory(Scheme(6, {n: 1.0 for n in space.positions}))
    for share in (0.2, 0.5, 0.8):      # the finer space holds the coarse one: never worse
        assert exact_search(space, share * top).score >= exact_search(coarse, share * top).score
    for bad in ([0.3], []):
        with pytest.raises(ValueError, match="restrict"):
            space.restrict(bad)
