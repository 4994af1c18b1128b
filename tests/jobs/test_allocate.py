"""Allocation logic on synthetic tables (no Ray), and screening + budget on the small CNN."""
import itertools
import random

import pytest

from jobs.search.allocate import InfeasibleTarget, Option, allocate_budget


def _table(seed=0, n_layers=5, n_opts=4):
    rng = random.Random(seed)
    layers = {}
    for i in range(n_layers):
        dense = rng.randint(50, 100)
        opts = [Option(None, None, dense, 0.0)]
        for j in range(n_opts):
            cost = rng.randint(5, dense - 1)
            opts.append(Option(rng.choice(["tucker2", "cp3", "spatial-svd"]), j + 1, cost,
                               round(rng.random() / cost * 50, 4)))
        layers[f"l{i}"] = opts
    return layers


def _brute(layers, budget):
    best = None
    for combo in itertools.product(*layers.values()):
        cost = sum(o.cost for o in combo)
        if cost <= budget:
            loss = sum(o.loss for o in combo)
            if best is None or loss < best - 1e-12:
                best = loss
    return best


@pytest.mark.parametrize("seed", range(6))
def test_budget_is_met_and_optimal(seed):
    layers = _table(seed)
    dense = sum(o.cost for os_ in layers.values() for o in os_ if o.method is None)
    ratio = 1.6
    budget = dense / ratio
    a = allocate_budget(layers, ratio=ratio, resolution=20000)
    assert a.cost <= budget + 1e-9 and a.ratio >= ratio
    assert a.loss == pytest.approx(_brute(layers, budget), abs=2e-3)


def test_monotone_in_the_target():
    layers = _table(1, n_layers=6, n_opts=5)
    losses, ratios = [], []
    for r in [1.0, 1.2, 1.5, 1.8, 2.1, 2.4]:
        a = allocate_budget(layers, ratio=r)
        assert a.ratio >= r
        losses.append(a.loss)
        ratios.append(a.ratio)
    assert losses == sorted(losses)
    assert allocate_budget(layers, ratio=1.0).loss == 0.0  # no compression asked: all dense


def test_ties_are_deterministic():
    layers = {"a": [Option(None, None, 10, 0.0), Option("tucker2", 2, 5, 0.1), Option("cp3", 4, 5, 0.1)]}
    for _ in range(3):
        assert allocate_budget(layers, ratio=2).choice["a"].method == "cp3"  # equal loss and cost: name order


def test_infeasible_and_invalid_targets():
    layers = _table(2)
    with pytest.raises(InfeasibleTarget, match=r"ratio 50 is not reachable: the most these options reach is"):
        allocate_budget(layers, ratio=50)
    with pytest.raises(InfeasibleTarget, match="must be >= 1"):
        allocate_budget(layers, ratio=0.5)
    with pytest.raises(ValueError, match="exactly one dense option"):
        allocate_budget({"x": [Option("cp3", 1, 1, 0.0)]}, ratio=1)


def test_screening_and_budget_on_the_small_cnn():
    import lowrank
    from jobs.models import SmallCNN
    from jobs.search.screen import screen_layer

    model = SmallCNN(10).eval()
    shape = (3, 32, 32)
    from lowrank.accounting import layer_input_shapes

    names = [n for n in lowrank.plan_layers(model, "tucker2", 1)]
    shapes = layer_input_shapes(model, names, shape)
    layers, screened_params = {}, 0
    for n in names:
        rows = screen_layer(n, model.get_submodule(n), shapes[n], ["tucker2", "spatial-svd"],
                            ratios=(1.2, 1.4, 1.6, 1.8, 2, 2.25, 2.5, 3, 4))
        ok = [r for r in rows if r["status"] == "ok"]
        assert ok[0]["method"] is None and all(r["latency"] > 0 and r["params"] > 0 for r in ok)
        assert all(0 < r["rel_error"] < 1 for r in ok[1:])
        screened_params += ok[0]["params"]
        layers[n] = [Option(r["method"], r["rank"], r["params"], r["rel_error"] ** 2) for r in ok]
    total = sum(p.numel() for p in model.parameters())
    a = allocate_budget(layers, ratio=2.0, fixed_cost=total - screened_params)
    assert 2.0 <= a.ratio <= 2.0 * 1.05  # the requested parameter ratio, within 5 %
    plan = {n: (o.method, o.rank) for n, o in a.choice.items() if o.method}
    new, reports = lowrank.compress_model(model, plan)
    assert total / sum(p.numel() for p in new.parameters()) == pytest.approx(a.ratio, rel=1e-9)


def test_screening_with_multiple_of_holds_the_rounded_ranks_it_timed():
    from jobs.models import SmallCNN
    from jobs.search.screen import screen_layer

    conv = SmallCNN(10).eval().features[6]  # 64 -> 64, 3x3
    plain, rounded = (screen_layer("features.6", conv, (1, 64, 16, 16), ["tucker2", "spatial-svd"], ratios=(1.5, 2, 3),
                                   multiple_of=k) for k in (1, 16))
    ranks = [r["rank"] for r in rounded if r["status"] == "ok" and r["method"]]
    assert ranks and all(v % 16 == 0 for r in ranks for v in (r if isinstance(r, tuple) else (r,)))
    assert [r["rank"] for r in plain if r["method"]] != ranks  # the ratios alone pick other ranks


def test_latency_target_leaves_layers_whose_options_are_slower_dense():
    """Latency costs: a layer whose factorized options all run slower than dense (CP with a
    rank above the channel count) is never factorized; the speedup comes from the others."""
    layers = {
        "slow": [Option(None, None, 10.0, 0.0), Option("cp3", 300, 14.0, 0.0), Option("cp3", 150, 11.0, 0.0)],
        "fast": [Option(None, None, 10.0, 0.0), Option("spatial-svd", 8, 4.0, 0.2), Option("spatial-svd", 16, 6.0, 0.1)],
    }
    a = allocate_budget(layers, ratio=1.25, fixed_cost=0.0)
    assert a.choice["slow"].method is None  # losses are 0 there, yet slower options buy nothing
    assert a.choice["fast"].rank == 16 and a.ratio >= 1.25
    with pytest.raises(InfeasibleTarget, match="the most these options reach is 1.43x"):
        allocate_budget(layers, ratio=2.0)


@pytest.mark.parametrize("passes,expected", [
    (lambda r: True, 4.0),  # the most compressed end passes: one probe
    (lambda r: r <= 2.5, 2.5),  # a threshold inside: bisection converges below it
    (lambda r: False, None),  # nothing passes: dense
])
def test_tolerance_bisection(passes, expected):
    from jobs.search.strategies import bisect_step

    lo, hi, nxt, probes, best = 1.0, 4.0, 4.0, 0, None
    while nxt is not None and probes < 20:
        ok = passes(nxt)
        best = nxt if ok else best
        lo, hi, nxt = bisect_step(lo, hi, nxt, ok)
        probes += 1
    if expected is None:
        assert best is None and hi / lo <= 1.02
    elif expected == 4.0:
        assert best == 4.0 and probes == 1
    else:
        assert expected / 1.02 <= best <= expected and probes <= 8


def test_a_latency_budget_leaves_a_layer_dense_whose_factorized_options_are_slower():
    """On a runtime where factorizing layer 'slow' only adds time (per-operation overhead), the
    latency allocation keeps it dense and takes the whole saving from the layer that does speed up."""
    layers = {"slow": [Option(None, None, 10.0, 0.0), Option("tucker2", 4, 14.0, 0.001), Option("cp3", 8, 12.0, 0.0)],
              "fast": [Option(None, None, 10.0, 0.0), Option("tucker2", 4, 5.0, 0.2), Option("tucker2", 8, 7.0, 0.1)]}
    choice = allocate_budget(layers, ratio=20 / 16).choice
    assert choice["slow"].method is None
    assert choice["fast"].rank == 4
