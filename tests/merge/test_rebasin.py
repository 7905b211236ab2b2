"""Git Re-Basin: weight / activation / STE matching, barrier, BN reset, REPAIR, the git_rebasin method."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import testkit.models as zoo_mod  # noqa: E402
from merge.errors import RecipeError, ShapeMismatchError
from merge.methods import get_method
from merge.rebasin.api import rebasin
from merge.rebasin.evaluation import interpolate, loss_barrier, repair, reset_bn
from merge.rebasin.matching import activation_matching, matching_objective, ste_matching, weight_matching
from merge.symmetry import (
    PermutationSpec,
    apply_permutation,
    build_spec,
    check_spec,
    infer_spec,
    invert,
    mlp_spec,
    transformer_spec,
)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def spec_for(arch: str, model: nn.Module) -> PermutationSpec:
    return build_spec(arch, model.state_dict(), **({"n_heads": 4} if arch == "transformer" else {}))


# ---------------------------------------------------------------------------------------------
# weight matching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "transformer"])
def test_planted_permutation_is_recovered_exactly(arch):
    model, _ = zoo_mod.zoo()[arch]
    spec = spec_for(arch, model)
    a = state(model)
    sigma = spec.random_perms(torch.Generator().manual_seed(3))
    b = apply_permutation(spec, a, sigma)  # B = σ(A)
    res = weight_matching(spec, a, b, seed=1)
    inv = invert(sigma)
    for p in spec.perms:
        assert torch.equal(res.perms[p], inv[p]), p  # π = argsort(σ)
    back = apply_permutation(spec, b, res.perms)
    for k in a:
        assert torch.equal(back[k], a[k]), k  # includes BN running statistics
    assert res.objective == pytest.approx(matching_objective(spec, a, a, spec.identity()))


def test_two_unit_swap_by_hand():
    """Two identity networks, B with its hidden units swapped: the objective goes from 0 to 4."""
    spec = PermutationSpec({"w1": ("P", None), "w2": (None, "P")}, {"w1": (2, 2), "w2": (2, 2)})
    eye, swap = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    a, b = {"w1": eye, "w2": eye}, {"w1": swap, "w2": swap}
    assert matching_objective(spec, a, b, spec.identity()) == 0.0
    res = weight_matching(spec, a, b)
    assert res.perms["P"].tolist() == [1, 0] and res.objective == 4.0


def test_identical_models_stop_after_one_sweep():
    model, _ = zoo_mod.zoo()["resnet"]
    spec = spec_for("resnet", model)
    a = state(model)
    res = weight_matching(spec, a, a)
    assert res.iterations == 1  # no unit improves: identity is optimal and ties do not count as progress
    assert all(torch.equal(v, torch.arange(len(v))) for v in res.perms.values())


def independent_pair(arch: str = "mlp", dims: tuple[int, ...] = (8, 24, 24, 24, 4)):
    torch.manual_seed(0)
    ma = zoo_mod.MLP(dims) if arch == "mlp" else zoo_mod.zoo()[arch][0]
    torch.manual_seed(1)
    mb = zoo_mod.MLP(dims) if arch == "mlp" else zoo_mod.randomize_bn(type(ma)(), 1)
    return ma, mb


def test_objective_monotone_restarts_and_skipping_exact():
    ma, mb = independent_pair()
    spec = mlp_spec(ma.state_dict())
    a, b = state(ma), state(mb)
    ident = matching_objective(spec, a, b, spec.identity())
    r1 = weight_matching(spec, a, b, seed=0)
    assert r1.objective > ident
    noskip = weight_matching(spec, a, b, seed=0, skip_unchanged=False)
    assert all(torch.equal(r1.perms[p], noskip.perms[p]) for p in spec.perms)
    assert r1.objective == noskip.objective and r1.solves < noskip.solves and r1.skipped > 0
    many = weight_matching(spec, a, b, seed=0, n_restarts=4)
    assert len(many.restarts) == 4 and many.objective == max(many.restarts)
    assert many.restarts[0] == pytest.approx(r1.objective)
    # the answer is a local optimum: one more sweep from it finds nothing
    again = weight_matching(spec, a, b, init_perms=r1.perms, seed=5)
    assert again.iterations == 1 and again.objective == pytest.approx(r1.objective)


def test_weight_matching_preserves_function_on_independent_models():
    for arch in ("mlp", "resnet"):
        ma, mb = independent_pair(arch)
        x = torch.randn(4, 8) if arch == "mlp" else torch.randn(2, 3, 16, 16)
        al = rebasin(state(ma), state(mb), architecture=arch)
        mb.eval()
        with torch.no_grad():
            ref = mb(x)
            out = torch.func.functional_call(mb, al.state, (x,))
        assert (out - ref).abs().max() < 1e-5
        assert al.result.objective >= matching_objective(al.spec, state(ma), state(mb), al.spec.identity())


def test_head_groups_are_solved_jointly():
    torch.manual_seed(0)
    ma = zoo_mod.Transformer()
    torch.manual_seed(1)
    mb = zoo_mod.Transformer()
    spec = transformer_spec(ma.state_dict(), 4)
    res = weight_matching(spec, state(ma), state(mb))
    spec.check_perms(res.perms)  # block structured, q/k and v/o share the head permutation
    x = torch.randint(0, 50, (2, 12))
    mb.eval()
    with torch.no_grad():
        diff = torch.func.functional_call(mb, apply_permutation(spec, state(mb), res.perms), (x,)) - mb(x)
    assert diff.abs().max() < 1e-4


def test_weight_matching_rejects_mismatched_models():
    ma, _ = independent_pair()
    spec = mlp_spec(ma.state_dict())
    b = state(ma)
    b["layers.2.weight"] = torch.zeros(24, 25)
    with pytest.raises(ShapeMismatchError, match="model B: tensor 'layers.2.weight'"):
        weight_matching(spec, state(ma), b)


# ---------------------------------------------------------------------------------------------
# activation matching and STE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_activation_matching_recovers_planted_permutation(arch):
    model, x = zoo_mod.zoo()[arch]
    spec = infer_spec(model, (x,))
    a = state(model)
    sigma = spec.random_perms(torch.Generator().manual_seed(2))
    mb = type(model)()
    mb.load_state_dict(apply_permutation(spec, a, sigma))
    data = [x, x[:1]] if arch == "transformer" else [torch.randn(64, 8) for _ in range(3)]
    res = activation_matching(model, mb, data, spec=spec)
    inv = invert(sigma)
    assert all(torch.equal(res.perms[p], inv[p]) for p in spec.perms)


def test_activation_matching_maps_onto_a_ready_spec():
    ma, mb = independent_pair()
    spec = mlp_spec(ma.state_dict())
    res = activation_matching(ma, mb, [torch.randn(32, 8)], spec=spec)
    assert set(res.perms) == set(spec.perms)
    spec.check_perms(res.perms)
    wrong = PermutationSpec({"layers.0.weight": ("X", None)}, {"layers.0.weight": (24, 8)})
    with pytest.raises(RecipeError, match="no counterpart"):
        activation_matching(ma, mb, [torch.randn(4, 8)], spec=wrong)


def test_ste_returns_valid_function_preserving_permutations():
    ma, mb = independent_pair(dims=(8, 16, 16, 3))
    spec = mlp_spec(ma.state_dict())
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    res = ste_matching(zoo_mod.MLP((8, 16, 16, 3)), spec, state(ma), state(mb), data, epochs=2)
    spec.check_perms(res.perms)
    assert res.iterations == 8 and math.isfinite(res.history[0])
    x = data[0][0]
    with torch.no_grad():
        d = torch.func.functional_call(mb, apply_permutation(spec, state(mb), res.perms), (x,)) - mb(x)
    assert d.abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# barrier, BN reset, REPAIR
# ---------------------------------------------------------------------------------------------


class Product(nn.Module):
    """f(x) = w1·w2·x, a one-path network whose interpolation has a bump."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(()))
        self.w2 = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1 * self.w2 * x


def test_loss_barrier_by_hand():
    """A = (1, 1), B = (-1, -1), target y = x = 1: L(λ) = ((1-2λ)² - 1)², so L(0) = L(1) = 0, L(½) = 1."""

    def model_fn(sd):
        m = Product()
        m.load_state_dict(sd)
        return m

    a = {"w1": torch.tensor(1.0), "w2": torch.tensor(1.0)}
    b = {"w1": torch.tensor(-1.0), "w2": torch.tensor(-1.0)}
    data = [(torch.ones(1), torch.ones(1))]
    r = loss_barrier(model_fn, a, b, data, steps=3, loss_fn=nn.functional.mse_loss)
    assert r.lambdas == [0.0, 0.5, 1.0] and r.losses == [0.0, 1.0, 0.0] and r.barrier == 1.0
    assert r.accuracies is None
    r25 = loss_barrier(model_fn, a, b, data, loss_fn=nn.functional.mse_loss)
    assert len(r25.lambdas) == 25 and r25.barrier == pytest.approx(1.0)
    # the barrier subtracts the mean of the endpoint losses, not their linear interpolation
    c = {"w1": torch.tensor(2.0), "w2": torch.tensor(1.0)}
    r2 = loss_barrier(model_fn, a, c, data, steps=3, loss_fn=nn.functional.mse_loss)
    assert r2.losses == [0.0, 0.25, 1.0] and r2.barrier == 0.5


def test_interpolate_keeps_integer_buffers():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(7)}
    out = interpolate(a, b, 0.25)
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0])) and int(out["n"]) == 3


def test_reset_bn_recomputes_statistics():
    bn = nn.Sequential(nn.BatchNorm1d(3))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(50, 3, generator=g) * 2 + 1 for _ in range(4)]
    reset_bn(bn, data)
    allx = torch.cat(data)
    assert torch.allclose(bn[0].running_mean, allx.mean(0), atol=1e-5)
    # cumulative average of the per-batch unbiased variances
    var = torch.stack([d.var(0) for d in data]).mean(0)
    assert torch.allclose(bn[0].running_var, var, atol=1e-5)
    assert bn[0].momentum == 0.1 and bn.training  # momentum and mode restored


def test_repair_matches_interpolated_statistics():
    ma, mb = independent_pair(dims=(8, 32, 32, 4))
    spec = mlp_spec(ma.state_dict())
    al = rebasin(state(ma), state(mb), spec=spec)
    mb_al = zoo_mod.MLP((8, 32, 32, 4))
    mb_al.load_state_dict(al.state)
    merged = zoo_mod.MLP((8, 32, 32, 4))
    merged.load_state_dict(al.merge(state(ma), 0.5))
    data = [torch.randn(256, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    repair(merged, ma, mb_al, data, 0.5)
    x = torch.cat(data)

    def hidden(m, i):  # output of the i-th Linear
        out = {}
        h = m.layers[i].register_forward_hook(lambda _m, _i, o: out.setdefault("z", o))
        with torch.no_grad():
            m(x)
        h.remove()
        return out["z"]

    for i in (0, 2):  # repaired layers: every Linear but the last
        za, zb, zm = hidden(ma, i), hidden(mb_al, i), hidden(merged, i)
        mu_t = 0.5 * (za.mean(0) + zb.mean(0))
        sd_t = 0.5 * (za.std(0, unbiased=False) + zb.std(0, unbiased=False))
        assert torch.allclose(zm.mean(0), mu_t, atol=1e-4)
        assert torch.allclose(zm.std(0, unbiased=False), sd_t, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# the registered recipe method
# ---------------------------------------------------------------------------------------------


class Counting(dict):
    """A read-only mapping like the engine's lazy checkpoint views, counting tensor reads."""

    def __init__(self, d):
        super().__init__(d)
        self.reads: list[str] = []

    def __getitem__(self, k):
        self.reads.append(k)
        return super().__getitem__(k)

    def shape(self, k):
        return tuple(dict.__getitem__(self, k).shape)


def test_registry_entry():
    m = get_method("git_rebasin")
    assert m.kind == "whole_model" and m.base == "optional"
    assert {"lambda", "architecture", "spec", "seed", "n_heads", "rope", "max_iter", "n_restarts"} <= set(
        m.params
    )
    assert m.params["lambda"].default == 0.5 and "arxiv.org/abs/2209.04836" in m.url
    assert m.describe()["summary"].startswith("Align models by weight matching")


def test_git_rebasin_method_planted_gives_back_a():
    model, x = zoo_mod.zoo()["resnet"]
    spec = spec_for("resnet", model)
    a = state(model)
    b = apply_permutation(spec, a, spec.random_perms(torch.Generator().manual_seed(0)))
    fn = get_method("git_rebasin").fn
    plan = fn([Counting(b)], Counting(a), lambda_=0.3, architecture="resnet", seed=0)
    for k in a:
        if not a[k].is_floating_point():
            continue  # integer buffers are copied by the engine
        out = plan.apply(k, [b[k].float()], a[k].float())
        assert torch.allclose(out, a[k].float(), atol=1e-6), k  # π(B) = A, so any λ gives A


def test_git_rebasin_method_reads_only_what_it_needs_and_preserves_b_at_lambda_one():
    ma, mb = independent_pair()
    a, b = Counting(state(ma)), Counting(state(mb))
    plan = get_method("git_rebasin").fn([b], a, lambda_=1.0, architecture="mlp")
    needed = set(plan.spec.permuted_tensors())
    assert set(a.reads) == needed == set(b.reads) and len(a.reads) == len(needed)
    merged = {k: plan.apply(k, [dict.__getitem__(b, k)], dict.__getitem__(a, k)) for k in a}
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert (torch.func.functional_call(mb, merged, (x,)) - mb(x)).abs().max() < 1e-5
    plan0 = get_method("git_rebasin").fn([b], a, lambda_=0.0, architecture="mlp")
    assert all(
        torch.equal(plan0.apply(k, [dict.__getitem__(b, k)], dict.__getitem__(a, k)), dict.__getitem__(a, k))
        for k in a
    )


def test_git_rebasin_method_spec_json_and_no_base(tmp_path):
    torch.manual_seed(0)
    ma, mb = zoo_mod.Transformer(), zoo_mod.Transformer()
    spec = transformer_spec(ma.state_dict(), 4)
    spec.save(tmp_path / "spec.json")
    a, b = state(ma), state(mb)
    fn = get_method("git_rebasin").fn
    plan = fn([a, b], None, lambda_=0.5, spec=str(tmp_path / "spec.json"))
    direct = fn([b], a, lambda_=0.5, n_heads=4, architecture="transformer")
    for k in a:
        assert torch.equal(plan.apply(k, [a[k], b[k]], None), direct.apply(k, [b[k]], a[k]))
    assert json.loads((tmp_path / "spec.json").read_text())["format"] == "weightsmith.permutation_spec"


def test_git_rebasin_method_errors():
    ma, mb = independent_pair()
    a, b = state(ma), state(mb)
    fn = get_method("git_rebasin").fn
    with pytest.raises(RecipeError, match="exactly one of the parameters 'architecture' or 'spec'"):
        fn([b], a)
    with pytest.raises(RecipeError, match="exactly one"):
        fn([b], a, architecture="mlp", spec="x.json")
    with pytest.raises(RecipeError, match="exactly two models"):
        fn([b], None, architecture="mlp")
    with pytest.raises(RecipeError, match="unknown architecture 'lstm'"):
        fn([b], a, architecture="lstm")
    bad = dict(b)
    bad["layers.2.weight"] = torch.zeros(24, 23)
    with pytest.raises(ShapeMismatchError, match="model 1: tensor 'layers.2.weight'"):
        fn([bad], a, architecture="mlp")
    with pytest.raises(RecipeError, match="lambda must be finite"):
        fn([b], a, architecture="mlp", lambda_=float("nan"))


def test_spec_check_on_traced_models_used_by_rebasin():
    """rebasin() can infer the spec by fx tracing (checked by random permutation first)."""
    ma, mb = independent_pair()
    x = torch.randn(3, 8)
    al = rebasin(state(ma), state(mb), model=ma, example_inputs=(x,))
    assert check_spec(ma, al.spec, (x,)) < 1e-5
    with torch.no_grad():
        assert (torch.func.functional_call(mb, al.state, (x,)) - mb(x)).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# the experiment (slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_barrier_falls_after_matching():
    """Reduced examples/rebasin_digits.py: width 128, 60 epochs; matching must cut the test barrier."""
    path = Path(__file__).resolve().parents[2] / "examples" / "rebasin_digits.py"
    spec = importlib.util.spec_from_file_location("_rebasin_digits", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    r = ex.run_width(128, epochs=60, steps=13)
    naive = r["naive"]["test_barrier"]
    assert naive > 0.1
    assert r["weight_matching"]["test_barrier"] < 0.5 * naive
    assert r["activation_matching"]["test_barrier"] < 0.5 * naive
    assert r["weight_matching"]["mid_test_acc"] > r["naive"]["mid_test_acc"]
    assert r["weight_matching"]["max_abs_dfB"] < 1e-4 and r["activation_matching"]["max_abs_dfB"] < 1e-4


def test_spec_is_a_path_parameter_and_goes_through_the_engines_path_resolver(tmp_path):
    """``spec`` is marked ``FilePath``: the engine hands it to ``MergeOptions.path_resolver`` (the
    service confines it to its roots there) before the method opens it, and uses what it returns."""
    from safetensors.torch import save_file

    from merge.execute import run_merge
    from merge.plan import MergeOptions

    m = get_method("git_rebasin")
    assert m.params["spec"].path and not m.params["architecture"].path
    assert get_method("concrete_task_arithmetic").params["plan"].path
    ma, mb = independent_pair()
    for name, mod in (("a", ma), ("b", mb)):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in state(mod).items()}, str(tmp_path / name / "model.safetensors"))
    spec_for("mlp", ma).save(tmp_path / "spec.json")
    calls = []

    def resolve(value, field):
        calls.append((value, field))
        return str(tmp_path / "spec.json")

    recipe = {
        "merge_method": "git_rebasin",
        "base_model": str(tmp_path / "a"),
        "models": [{"model": str(tmp_path / "b")}],
        "parameters": {"lambda": 1.0, "spec": "named-by-client"},
    }
    run_merge(recipe, tmp_path / "out", MergeOptions(path_resolver=resolve))
    assert calls and all(c == ("named-by-client", "parameters.spec") for c in calls)

    def refuse(value, field):
        raise RecipeError(f"{field}: {value!r} refused")

    with pytest.raises(RecipeError, match="parameters.spec: 'named-by-client' refused"):
        run_merge(recipe, tmp_path / "out2", MergeOptions(path_resolver=refuse))
    assert not (tmp_path / "out2").exists()
