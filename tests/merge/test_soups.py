"""Greedy soups, the sparse_soup method, global magnitude pruning and the SMS/IMP loop (merge/methods/soups.py)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from merge.errors import MaskMismatchError, MissingTensorError, RecipeError, ShapeMismatchError
from merge.execute import run_merge
from merge.methods import get_method
from merge.methods.runner import merge_tensors
from merge.methods.soups import (
    global_magnitude_prune,
    greedy_soup,
    iterative_magnitude_pruning,
    prunable_weights,
    sparse_model_soup,
    sparse_soup,
    sparsity,
    sparsity_schedule,
)
from tests.conftest import write_checkpoint

# ---------------------------------------------------------------------------------------------
# greedy soup
# ---------------------------------------------------------------------------------------------


def scalar(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v]), "step": torch.tensor([7])}


def test_greedy_soup_hand_worked() -> None:
    # score = -(w - 1)^2 (dyadic values: exact in float32); ingredients 0.25, 1.5, 0.75, 3.0
    # alone: -0.5625, -0.25, -0.0625, -4 -> order 0.75, 1.5, 0.25, 3.0
    # 1.5: avg 1.125 -> -0.015625 >= -0.0625 kept; 0.25: avg (2.25 + 0.25) / 3 -> -0.02778 rejected;
    # 3.0: avg (2.25 + 3) / 3 = 1.75 -> -0.5625 rejected
    ing = [scalar(0.25), scalar(1.5), scalar(0.75), scalar(3.0)]
    calls: list[float] = []

    def score(sd: dict[str, torch.Tensor]) -> float:
        calls.append(float(sd["w"]))
        assert sd["w"].dtype == torch.float32 and sd["step"].dtype == torch.int64
        return -((float(sd["w"]) - 1.0) ** 2)

    r = greedy_soup(ing, score, names=["a", "b", "c", "d"])
    assert r.kept == ["c", "b"]
    assert [s.name for s in r.steps] == ["c", "b", "a", "d"]
    assert [s.kept for s in r.steps] == [True, True, False, False]
    assert [s.soup_size for s in r.steps] == [1, 2, 2, 2]
    assert [s.soup_score for s in r.steps] == pytest.approx(
        [-0.0625, -0.015625, -((2.5 / 3 - 1) ** 2), -0.5625]
    )
    assert float(r.state_dict["w"]) == 1.125
    assert torch.equal(r.state_dict["step"], torch.tensor([7]))
    assert r.score == -0.015625 and r.individual == {"a": -0.5625, "b": -0.25, "c": -0.0625, "d": -4.0}
    assert len(calls) == 4 + 3  # each ingredient alone, then one candidate soup per further ingredient
    # ties: ">=" keeps an ingredient that leaves the score unchanged, strict ">" does not
    flat = [scalar(0.75), scalar(1.5), scalar(0.25), scalar(3.0)]

    def coarse(sd: dict[str, torch.Tensor]) -> float:
        return float(float(sd["w"]) < 2)

    assert greedy_soup(flat, coarse, names=["a", "b", "c", "d"]).kept == ["a", "b", "c", "d"]
    rs = greedy_soup(flat, coarse, names=["a", "b", "c", "d"], strict=True)
    assert rs.kept == ["a"] and float(rs.state_dict["w"]) == 0.75


@pytest.mark.parametrize("seed", range(5))
def test_greedy_soup_never_scores_below_its_best_ingredient(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(16, generator=g)
    ing = [{"w": target + s * torch.randn(16, generator=g)} for s in (0.3, 0.5, 0.5, 0.8, 3.0, 5.0)]

    def score(sd: dict[str, torch.Tensor]) -> float:
        return -float(((sd["w"] - target) ** 2).sum())

    r = greedy_soup(ing, score)
    best = max(r.individual.values())
    assert r.score >= best
    assert score(r.state_dict) == pytest.approx(r.score)
    uniform = {"w": torch.stack([i["w"] for i in ing]).mean(0)}
    assert r.score >= score(uniform)  # the bad ingredients (σ = 3, 5) hurt the uniform soup
    assert "ingredient4" not in r.kept and "ingredient5" not in r.kept
    # every logged soup score is monotone over kept steps
    kept_scores = [s.soup_score for s in r.steps if s.kept]
    assert kept_scores == sorted(kept_scores)


def test_greedy_soup_holds_at_most_two_ingredients_at_once() -> None:
    alive: list[weakref.ref] = []
    peak = {"n": 0}

    class SD(dict):
        pass

    def loader(v: float):
        def load() -> SD:  # reference counting frees a dropped ingredient at once (no cycles)
            peak["n"] = max(peak["n"], sum(r() is not None for r in alive) + 1)
            sd = SD(w=torch.full((4,), v))
            alive.append(weakref.ref(sd))
            return sd

        return load

    r = greedy_soup([loader(v) for v in (1.0, 2.0, 3.0, 4.0, 5.0)], lambda sd: -float(sd["w"][0]))
    assert r.kept == ["ingredient0"]
    assert peak["n"] <= 2, peak


def test_greedy_soup_bad_input() -> None:
    with pytest.raises(
        ShapeMismatchError, match="ingredient 'b': tensor 'w' has shape \\[3\\], expected \\[1\\] as in 'a'"
    ):
        greedy_soup(
            [scalar(1.0), {"w": torch.zeros(3), "step": torch.tensor([7])}], lambda sd: 0.0, names=["a", "b"]
        )
    with pytest.raises(MissingTensorError, match="ingredient 'b': tensor 'step' is missing"):
        greedy_soup([scalar(1.0), {"w": torch.zeros(1)}], lambda sd: 0.0, names=["a", "b"])
    with pytest.raises(RecipeError, match="returned nan for ingredient 'a'"):
        greedy_soup([scalar(1.0), scalar(2.0)], lambda sd: float("nan"), names=["a", "b"])
    with pytest.raises(RecipeError, match="no ingredients"):
        greedy_soup([], lambda sd: 0.0)


def test_greedy_soup_of_checkpoints_matches_the_linear_merge_bit_for_bit(tmp_path: Path) -> None:
    from tests.conftest import llama_like

    base = llama_like(0)
    paths = [
        write_checkpoint(tmp_path / f"m{i}", llama_like(i, base=base, noise=0.01 * i, dtype=torch.bfloat16))
        for i in range(1, 5)
    ]
    target = base["lm_head.weight"].float()

    def score(sd: dict[str, torch.Tensor]) -> float:
        return -float((sd["lm_head.weight"].float() - target).pow(2).sum())

    r = greedy_soup(paths, score)
    assert r.kept[0] == "m1"
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / k)} for k in r.kept]}
    run_merge(recipe, tmp_path / "out")
    from merge.checkpoint import open_checkpoint

    out = open_checkpoint(tmp_path / "out")
    for k, v in r.state_dict.items():
        assert v.dtype == torch.bfloat16 and torch.equal(out[k], v), k


# ---------------------------------------------------------------------------------------------
# sparse_soup
# ---------------------------------------------------------------------------------------------


def sparse_pair(seed: int = 0, density: float = 0.3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(12, 9, generator=g) < density
    return mask, [torch.randn(12, 9, generator=g) * mask for _ in range(3)]


def test_sparse_soup_keeps_the_shared_mask_exactly() -> None:
    mask, ts = sparse_pair()
    out = sparse_soup(ts, None, weight=[1.0, 2.0, 1.0], name="fc.weight")
    assert torch.equal(out != 0, mask)
    torch.testing.assert_close(out, (ts[0] + 2 * ts[1] + ts[2]) / 4)
    assert not torch.signbit(out[~mask]).any()  # +0.0, never -0.0
    # the engine's chunked form equals the whole-tensor call
    spec = get_method("sparse_soup")
    chunked = merge_tensors(
        spec,
        ts,
        None,
        {"weight": [1.0, 2.0, 1.0], "union": False, "mask_min_dims": 2},
        name="fc.weight",
        chunk_elems=18,
    )
    assert torch.equal(chunked, out)


def test_sparse_soup_refuses_different_masks_unless_union() -> None:
    mask, ts = sparse_pair()
    other = ts[1].clone()
    other[0, :] = 1.0  # a different zero pattern
    with pytest.raises(
        MaskMismatchError, match=r"tensor 'fc.weight': model 1 .* different zero pattern .*'union: true'"
    ):
        sparse_soup([ts[0], other], None, name="fc.weight")
    out = sparse_soup([ts[0], other], None, union=True, name="fc.weight")
    assert torch.equal(out != 0, (ts[0] != 0) | (other != 0))
    torch.testing.assert_close(out, (ts[0] + other) / 2)
    # 1-D tensors (biases, norms) are averaged whatever their zeros
    b = sparse_soup([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])], None, name="fc.bias")
    assert torch.equal(b, torch.tensor([0.5, 0.5]))


def test_sparse_soup_recipe_through_the_engine(tmp_path: Path) -> None:
    mask, ts = sparse_pair(1)
    bias = [torch.randn(12) for _ in ts]
    paths = [
        write_checkpoint(tmp_path / f"s{i}", {"fc.weight": t, "fc.bias": b}, config={})
        for i, (t, b) in enumerate(zip(ts, bias, strict=True))
    ]
    recipe = {"merge_method": "sparse_soup", "models": [{"model": str(p)} for p in paths]}
    run_merge(recipe, tmp_path / "soup")
    from merge.checkpoint import open_checkpoint

    out = open_checkpoint(tmp_path / "soup")
    assert torch.equal(out["fc.weight"] != 0, mask)
    bad = ts[2].clone()
    bad[3, 3] = 0.5 if bad[3, 3] == 0 else 0.0
    paths.append(write_checkpoint(tmp_path / "bad", {"fc.weight": bad, "fc.bias": bias[0]}, config={}))
    recipe["models"].append({"model": str(paths[-1])})
    with pytest.raises(MaskMismatchError, match="tensor 'fc.weight': model 3"):
        run_merge(recipe, tmp_path / "bad_soup")
    assert not (tmp_path / "bad_soup").exists() and not list(tmp_path.glob("bad_soup.partial-*"))
    recipe["parameters"] = {"union": True}
    run_merge(recipe, tmp_path / "union_soup")


# ---------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------


def test_sparsity_schedule() -> None:
    s = sparsity_schedule(0.95, 4)
    q = 1 - 0.05**0.25
    assert s == pytest.approx([1 - (1 - q) ** i for i in (1, 2, 3, 4)])
    assert s[-1] == pytest.approx(0.95)
    assert sparsity_schedule(0.5, 1) == [0.5]
    with pytest.raises(RecipeError):
        sparsity_schedule(1.0, 3)


def mlp(seed: int = 0, bn: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, 32)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(32))
    layers += [torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)]
    return torch.nn.Sequential(*layers)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread (OpenMP threads only spin-wait on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_prunable_weights_are_matrices_only() -> None:
    assert sorted(prunable_weights(mlp())) == ["0.weight", "3.weight", "5.weight"]


def test_global_magnitude_pruning_matches_torch_prune() -> None:
    """Peer check: torch.nn.utils.prune.global_unstructured with L1Unstructured (the pruning the SMS
    reference code uses), three iterative phases on the same weights: identical masks."""
    import torch.nn.utils.prune as tprune

    a, b = mlp(1, bn=False), mlp(1, bn=False)
    params = [(b[i], "weight") for i in (0, 2, 4)]
    masks = None
    q = 1 - (1 - 0.9) ** (1 / 3)
    for _phase in range(3):
        masks = global_magnitude_prune({k: v.detach() for k, v in prunable_weights(a).items()}, q, masks)
        with torch.no_grad():
            for k, p in prunable_weights(a).items():
                p.mul_(masks[k])
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=q)
        for k, (mod, _) in zip(["0.weight", "2.weight", "4.weight"], params, strict=True):
            assert torch.equal(masks[k], mod.weight_mask.bool()), k
    assert sparsity(masks) == pytest.approx(0.9, abs=3 / sum(m.numel() for m in masks.values()))


def toy_task(seed: int = 0, n: int = 384) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-class problem: labels from one fixed random linear map (the same for every seed)."""
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x @ w).argmax(1)


def test_sparse_model_soup_invariants() -> None:
    from merge.rebasin.evaluation import reset_bn

    x, y = toy_task()
    xv, yv = toy_task(1, 256)
    model = mlp(0)
    seen: list[tuple[int, int, list[torch.Tensor]]] = []
    recalibrated = {"n": 0}

    def train(m: torch.nn.Module, var: dict, phase: int) -> None:
        g = torch.Generator().manual_seed(var["seed"] + 100 * phase)
        # weight decay and momentum must not revive pruned weights
        opt = torch.optim.SGD(m.parameters(), lr=var["lr"], momentum=0.9, weight_decay=1e-4)
        m.train()
        for _ in range(3):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                b = perm[i : i + 64]
                loss = torch.nn.functional.cross_entropy(m(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        seen.append((phase, var["seed"], [p.detach().clone() for p in prunable_weights(m).values()]))

    def evaluate(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float((m(xv).argmax(1) == yv).float().mean())

    def recal(m: torch.nn.Module) -> None:
        recalibrated["n"] += 1
        reset_bn(m, [(x[i : i + 64],) for i in range(0, len(x), 64)])

    variations = [{"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 0.1}, {"seed": 2, "lr": 0.05}]
    train(model, {"seed": 9, "lr": 0.1}, 0)  # the dense model
    dense = evaluate(model)
    seen.clear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = sparse_model_soup(
        model,
        train,
        evaluate,
        goal_sparsity=0.9,
        phases=3,
        variations=variations,
        recalibrate=recal,
        metrics=lambda m: {"val": evaluate(m)},
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched
    n = sum(m.numel() for m in r.masks.values())
    schedule = sparsity_schedule(0.9, 3)
    for i, rec in enumerate(r.phases):
        assert rec.target_sparsity == pytest.approx(schedule[i])
        assert abs(rec.sparsity - schedule[i]) <= (i + 1) / n  # a rounding of at most half an entry per phase
        assert len(rec.ingredients) == 3 and rec.kept == [0, 1, 2]
        assert all(ing.drift == 0 for ing in rec.ingredients)
        assert rec.metrics["val"] == pytest.approx(rec.score)
    # every ingredient of a phase had exactly the phase mask during and after training; later masks are subsets
    final = {k: m for k, m in r.masks.items()}
    for phase, _seed, ws in seen:
        nz = [w != 0 for w in ws]
        if phase == 3:
            assert all(torch.equal(a, b) for a, b in zip(nz, final.values(), strict=True))
        else:
            assert all(bool((b & ~a).sum() == 0) for a, b in zip(nz, final.values(), strict=True))
    # the soup's zero pattern is the mask, exactly
    for k, p in prunable_weights(r.model).items():
        assert torch.equal(p != 0, final[k]), k
    assert recalibrated["n"] == 3  # once per phase (uniform soup)
    assert dense > 0.8 and r.phases[-1].score > dense - 0.15  # it still works at 90 % sparsity


def test_greedy_sms_and_imp() -> None:
    x, y = toy_task()
    xv, yv = toy_task(1, 256)

    def train(m: torch.nn.Module, var: dict, phase: int) -> None:
        g = torch.Generator().manual_seed(var.get("seed", 0) + phase)
        opt = torch.optim.SGD(m.parameters(), lr=var.get("lr", 0.1), momentum=0.9)
        for _ in range(2):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                b = perm[i : i + 64]
                loss = torch.nn.functional.cross_entropy(m(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        if var.get("break"):  # a train function that ignores the mask: pruned entries come back
            with torch.no_grad():
                m[0].weight.add_(1.0)

    def evaluate(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float((m(xv).argmax(1) == yv).float().mean())

    r = sparse_model_soup(
        mlp(0, bn=False),
        train,
        evaluate,
        goal_sparsity=0.8,
        phases=2,
        soup="greedy",
        variations=[{"seed": 0}, {"seed": 1}, {"seed": 2, "lr": 5.0}, {"seed": 3, "break": True}],
    )
    for rec in r.phases:
        assert rec.greedy is not None and rec.score >= rec.greedy["best_individual"]
        assert rec.ingredients[3].drift > 0  # reported, and undone:
    for k, p in prunable_weights(r.model).items():
        assert torch.equal(p != 0, r.masks[k]), k
    imp = iterative_magnitude_pruning(
        mlp(0, bn=False), train, evaluate, goal_sparsity=0.8, phases=2, variation={"seed": 0}
    )
    assert [len(p.ingredients) for p in imp.phases] == [1, 1]
    assert imp.phases[-1].sparsity == pytest.approx(0.8, abs=2 / sum(m.numel() for m in imp.masks.values()))
    with pytest.raises(RecipeError, match="at least one variation"):
        sparse_model_soup(mlp(), train, evaluate, goal_sparsity=0.5, phases=1, variations=[])
