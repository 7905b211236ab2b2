"""AdaMerging and Concrete subspace masks: the math on small tensors, plans, the engine and bad input."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from merge.errors import CodeRefusedError, MergeCancelled, RecipeError, ShapeMismatchError, WeightsmithError
from merge.execute import Progress, run_merge
from merge.methods import get_method
from merge.methods._fusion import DifferentiableMerge, entropy_loss, fit_coefficients, load_entry_point
from merge.methods.concrete import (
    ConcreteMask,
    FusionPlan,
    FusionProblem,
    FusionTask,
    PlanMismatchError,
    learn_adamerging,
    learn_concrete_adamerging,
    learn_concrete_task_arithmetic,
)
from merge.methods.runner import merge_tensors
from merge.plan import MergeOptions
from service.cli.main import main
from tests.conftest import write_checkpoint
from tests.support import fusion_toy

ENTRY = "tests.support.fusion_toy:problem"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine, OpenMP's spinning threads made these tests 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy() -> tuple[dict, list[dict], FusionProblem]:
    base, models = fusion_toy.checkpoints()
    return base, models, fusion_toy.problem()


def _clone(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items()}


# -- the Concrete mask -------------------------------------------------------------------------------


def test_relaxed_sample_is_the_binary_concrete_formula() -> None:
    m = ConcreteMask({"w": (3, 4)}, init_logits=0.0, seed=7)
    with torch.no_grad():
        m.logits["w"].copy_(torch.linspace(-2, 2, 12).view(3, 4))
    g = m._gen("concrete:w")  # the stream the first sample uses
    u = torch.rand(3, 4, generator=g).clamp(1e-6, 1 - 1e-6)
    expect = torch.sigmoid((m.logits["w"] + torch.log(u) - torch.log(1 - u)) / 0.5)
    got = m.sample(0.5, rescale=False)["w"]
    assert torch.allclose(got, expect, atol=1e-6)
    # rescaled by its mean: mean 1, same ratios
    m2 = ConcreteMask({"w": (3, 4)}, seed=7)
    with torch.no_grad():
        m2.logits["w"].copy_(m.logits["w"])
    r = m2.sample(0.5)["w"]
    assert float(r.detach().mean()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(r, expect / expect.mean(), atol=1e-5)


def test_low_temperature_sample_is_binary_and_follows_the_logits() -> None:
    m = ConcreteMask({"w": (200, 50)}, seed=0)
    with torch.no_grad():
        m.logits["w"][:100] = 3.0  # keep-probability σ(3) = 0.953
        m.logits["w"][100:] = -3.0
    s = m.sample(1e-4, rescale=False)["w"].detach()
    assert float(((s > 1e-3) & (s < 1 - 1e-3)).float().mean()) < 1e-3  # binary
    assert float(s[:100].mean()) == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=0.01)
    assert float(s[100:].mean()) == pytest.approx(torch.sigmoid(torch.tensor(-3.0)).item(), abs=0.01)


def test_readouts_granularities_and_rescale() -> None:
    shapes = {"a": (4, 3), "b": (5,), "c": ()}
    m = ConcreteMask(shapes, granularity="row", seed=1)
    assert m.logits["a"].shape == (4, 1) and m.logits["b"].shape == (5,) and m.logits["c"].shape == ()
    with torch.no_grad():
        m.logits["a"].copy_(torch.tensor([[1.0], [-1.0], [2.0], [-0.5]]))
        m.logits["b"].copy_(torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0]))
    thr = m.readout("threshold")
    assert torch.equal(thr["a"].flatten(), torch.tensor([2.0, 0.0, 2.0, 0.0]))  # 1[x > 0] / mean (0.5)
    exp = m.readout("expected")
    sig = torch.sigmoid(m.logits["a"].detach())
    assert torch.allclose(exp["a"], sig / sig.mean())
    assert float(exp["b"].mean()) == pytest.approx(1.0, abs=1e-6)
    # deterministic read-outs do not move; seeded ones repeat with the seed and change with it
    assert all(torch.equal(exp[k], m.readout("expected")[k]) for k in shapes)
    s1, s2 = m.readout("sample"), m.readout("sample")
    assert all(torch.equal(s1[k], s2[k]) for k in shapes)
    other = ConcreteMask(shapes, granularity="row", seed=2)
    with torch.no_grad():
        for k in shapes:
            other.logits[k].copy_(m.logits[k])
    assert not torch.equal(other.readout("sample")["a"], s1["a"])
    b = m.readout("bernoulli", rescale=False)
    assert set(b["a"].unique().tolist()) <= {0.0, 1.0}
    # tensor granularity: one logit per tensor, rescaled by the model-wide (numel-weighted) mean
    t = ConcreteMask({"a": (4, 3), "b": (5,)}, granularity="tensor")
    with torch.no_grad():
        t.logits["a"].fill_(2.0)
        t.logits["b"].fill_(-2.0)
    e = t.readout("expected")
    assert t.logits["a"].shape == (1, 1)
    weighted = (12 * e["a"].item() + 5 * e["b"].item()) / 17
    assert weighted == pytest.approx(1.0, abs=1e-6)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert e["a"].item() / e["b"].item() == pytest.approx(sig(2) / sig(-2), rel=1e-5)
    with pytest.raises(RecipeError, match="granularity"):
        ConcreteMask(shapes, granularity="block")
    with pytest.raises(RecipeError, match="readout"):
        m.readout("mode")


# -- the differentiable merge ------------------------------------------------------------------------


def test_mix_and_combine_by_hand(toy) -> None:
    base, models, problem = toy
    dm = DifferentiableMerge(base, models, problem)
    k = "layers.0.bias"
    lam = torch.tensor([0.5, 0.25, -1.0])
    mixed = dm.mix(lam)
    expect = sum(w * (m[k] - base[k]) for w, m in zip(lam.tolist(), models, strict=True))
    assert torch.allclose(mixed[k], expect, atol=1e-6)
    mask = {kk: torch.full(dm.shapes[kk], 2.0) for kk in dm.keys}
    assert torch.allclose(dm.combine(mixed, mask)[k], base[k] + 2 * expect, atol=1e-6)
    # layer-wise: column i of λ belongs to learned tensor i
    lw = torch.zeros(3, dm.n_learned)
    i = dm.keys.index(k)
    lw[1, i] = 0.7
    out = dm.combine(dm.mix(lw))
    assert torch.allclose(out[k], base[k] + 0.7 * (models[1][k] - base[k]), atol=1e-6)
    j = dm.keys.index("layers.1.weight")
    assert torch.equal(out["layers.1.weight"], base["layers.1.weight"])  # λ = 0 there
    assert j != i


def test_all_ones_mask_is_task_arithmetic(toy) -> None:
    base, models, problem = toy
    dm = DifferentiableMerge(base, models, problem)
    ones = {k: torch.ones(()) for k in dm.keys}
    merged = dm.combine(dm.mix(torch.full((3,), 0.3)), ones)
    ta = get_method("task_arithmetic")
    for k in dm.keys:
        want = merge_tensors(ta, [m[k] for m in models], base[k], {"lambda_": 0.3})
        assert torch.allclose(merged[k], want, atol=1e-6), k
    # and a learned Concrete TA whose mask stays all ones (logits +30, thresholded) is TA, through the plan
    plan = learn_concrete_task_arithmetic(
        base, models, problem, steps=2, lr=1e-3, init_logits=30.0, readout="threshold"
    )
    assert plan.kept_fraction() == 1.0
    out = plan.merge(base, models)
    for k in base:
        want = merge_tensors(ta, [m[k] for m in models], base[k], {"lambda_": 0.3})
        assert torch.allclose(out[k], want, atol=1e-6), k


def test_gradients_reach_only_the_coefficients_and_the_mask_logits(toy) -> None:
    base, models, problem = toy
    base0, models0 = _clone(base), [_clone(m) for m in models]
    module_before = _clone(problem.model.state_dict())
    for p in problem.model.parameters():
        p.requires_grad_(True)
    dm = DifferentiableMerge(base, models, problem)
    mask = ConcreteMask({k: dm.shapes[k] for k in dm.keys}, seed=0)
    lam = dm.coefficients(0.3, "layer")
    batches = [x[:8] for x in fusion_toy.data()]
    losses = dm.backward(dm.combine(dm.mix(lam), mask.sample(0.5)), batches)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert lam.grad is not None and float(lam.grad.abs().sum()) > 0
    assert all(x.grad is not None and float(x.grad.abs().sum()) > 0 for x in mask.parameters())
    # nothing else has or needs a gradient, and nothing was modified
    assert all(not t.requires_grad for t in [*dm.base.values(), *dm.tau.values(), *dm.consts.values()])
    assert all(p.grad is None for p in problem.model.parameters())
    assert all(p.grad is None for t in problem.tasks for p in t.head.parameters())
    assert all(torch.equal(problem.model.state_dict()[k], v) for k, v in module_before.items())
    assert all(torch.equal(base[k], base0[k]) for k in base)
    assert all(torch.equal(m[k], m0[k]) for m, m0 in zip(models, models0, strict=True) for k in m)


def test_two_stage_backward_equals_the_full_graph(toy) -> None:
    """Per-task backward to the merged tensors, then through the merge == one backward of Σ_t L_t."""
    base, models, problem = toy
    dm = DifferentiableMerge(base, models, problem)
    batches = [x[:8] for x in fusion_toy.data()]
    lam1 = dm.coefficients(0.3, "layer")
    dm.backward(dm.combine(dm.mix(lam1)), batches)
    lam2 = dm.coefficients(0.3, "layer")
    merged = dm.combine(dm.mix(lam2))
    total = sum(entropy_loss(dm.task_logits(merged, t, b)) for t, b in enumerate(batches))
    total.backward()
    assert torch.allclose(lam1.grad, lam2.grad, atol=1e-6, rtol=1e-5)
    # the tasks concatenated into one forward (the default) or one after the other: the same gradient
    problem.batch_tasks = False
    seq = DifferentiableMerge(base, models, problem)
    lam3 = seq.coefficients(0.3, "layer")
    seq.backward(seq.combine(seq.mix(lam3)), batches)
    assert torch.allclose(lam1.grad, lam3.grad, atol=1e-6, rtol=1e-5)
    # and different batch sizes per task still concatenate correctly
    ragged = [x[: 4 + 2 * i] for i, x in enumerate(fusion_toy.data())]
    problem.batch_tasks = True
    lam4, lam5 = dm.coefficients(0.3, "task"), seq.coefficients(0.3, "task")
    la = dm.backward(dm.combine(dm.mix(lam4)), ragged)
    lb = seq.backward(seq.combine(seq.mix(lam5)), ragged)
    assert la == pytest.approx(lb, rel=1e-5) and torch.allclose(lam4.grad, lam5.grad, atol=1e-6, rtol=1e-5)


def test_one_adamerging_step_decreases_the_entropy(toy) -> None:
    base, models, _ = toy
    xs = fusion_toy.data()
    # the whole data as one batch, so the step is measured on what it was taken on
    problem = FusionProblem(
        fusion_toy.Toy(),
        [FusionTask(f"t{i}", x, head=h) for i, (x, h) in enumerate(zip(xs, fusion_toy.heads(), strict=True))],
    )
    for mode in ("task", "layer"):
        dm = DifferentiableMerge(base, models, problem)
        before = sum(dm.losses(dm.combine(dm.mix(torch.full((3,), 0.3))), xs))
        lam = fit_coefficients(
            dm, init=0.3, mode=mode, steps=1, lr=1e-3, clamp=True, batch_size=len(xs[0]), seed=0
        )
        after = sum(dm.losses(dm.combine(dm.mix(lam)), xs))
        assert after < before, (mode, before, after)
        assert not torch.equal(lam, torch.full_like(lam, 0.3))


def test_runs_are_seeded_and_reproducible(toy) -> None:
    base, models, problem = toy
    kw = dict(steps=5, lr=0.05, seed=3)
    a = learn_concrete_task_arithmetic(base, models, problem, **kw)
    b = learn_concrete_task_arithmetic(base, models, fusion_toy.problem(), **kw)
    c = learn_concrete_task_arithmetic(base, models, fusion_toy.problem(), **{**kw, "seed": 4})
    assert all(torch.equal(a.mask[k], b.mask[k]) for k in a.keys)
    assert not all(torch.equal(a.mask[k], c.mask[k]) for k in a.keys)
    e1 = learn_concrete_adamerging(base, models, problem, mask_steps=3, steps=3, readout="expected", seed=1)
    e2 = learn_concrete_adamerging(
        base, models, fusion_toy.problem(), mask_steps=3, steps=3, readout="expected", seed=1
    )
    assert torch.equal(e1.lambdas, e2.lambdas) and all(torch.equal(e1.mask[k], e2.mask[k]) for k in e1.keys)


def test_adamerging_modes_and_clamp(toy) -> None:
    base, models, problem = toy
    tw = learn_adamerging(base, models, problem, coefficients="task", steps=20, lr=0.1)
    assert torch.equal(tw.lambdas, tw.lambdas[:, :1].expand_as(tw.lambdas))  # one λ per task
    lw = learn_adamerging(base, models, problem, coefficients="layer", steps=20, lr=0.1)
    assert not torch.equal(lw.lambdas, lw.lambdas[:, :1].expand_as(lw.lambdas))
    assert float(lw.lambdas.min()) >= 0 and float(lw.lambdas.max()) <= 1  # clamped
    hist = lw.info["history"]["loss"]["coefficients"]
    assert hist["last"] < hist["first"]
    assert lw.mask is None and lw.kept_fraction() is None


# -- plans ------------------------------------------------------------------------------------------


def test_plan_by_hand_and_fallback_tensors() -> None:
    base = {
        "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "b": torch.tensor([1.0, 1.0]),
        "steps": torch.tensor([3]),
    }
    m1 = {"w": base["w"] + 1, "b": torch.tensor([2.0, 3.0]), "steps": torch.tensor([3])}
    m2 = {"w": base["w"] - 2, "b": torch.tensor([0.0, 5.0]), "steps": torch.tensor([3])}
    plan = FusionPlan(
        method="concrete_adamerging",
        keys=["w"],
        shapes={"w": (2, 2)},
        lambdas=torch.tensor([[0.5], [0.25]]),
        mask={"w": torch.tensor([[2.0], [0.0]])},
        fallback_lambda=0.5,
    )
    out = plan.merge(base, [m1, m2])
    # w: θ0 + m ⊙ (0.5·1 + 0.25·(−2)) = θ0 + m·0 ; make it non-trivial with another λ
    assert torch.equal(out["w"], base["w"])
    plan.lambdas = torch.tensor([[1.0], [0.25]])
    out = plan.merge(base, [m1, m2])
    assert torch.allclose(out["w"], torch.tensor([[2.0, 3.0], [3.0, 4.0]]))  # row 0: +2·0.5, row 1 masked
    # b is not learned: task arithmetic with the fallback λ: 1 + 0.5·((1, 2) + (−1, 4))
    assert torch.allclose(out["b"], torch.tensor([1.0, 4.0]))
    assert torch.equal(out["steps"], base["steps"])  # non-floating: the base's
    assert plan.kept_fraction() == 0.5


def test_plan_save_load_roundtrip_and_corruption(toy, tmp_path: Path) -> None:
    base, models, problem = toy
    plan = learn_concrete_adamerging(
        base, models, problem, mask_steps=3, steps=3, coefficients="layer", granularity="row"
    )
    plan.save(tmp_path / "plan")
    card = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert card["method"] == "concrete_adamerging" and card["n_tasks"] == 3 and card["has_mask"]
    assert card["task_names"] == ["task0", "task1", "task2"]
    assert set(card["keys"]) == set(plan.keys) and card["info"]["hyperparameters"]["granularity"] == "row"
    back = FusionPlan.load(tmp_path / "plan" / "plan.json")
    a, b = plan.merge(base, models), back.merge(base, models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(WeightsmithError, match="already exists"):
        plan.save(tmp_path / "plan")
    raw = bytearray((tmp_path / "plan" / "plan.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "plan" / "plan.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsmithError, match="SHA-256"):
        FusionPlan.load(tmp_path / "plan")
    with pytest.raises(WeightsmithError, match="not a fusion plan"):
        FusionPlan.load(tmp_path)


def test_plan_refuses_other_models(toy) -> None:
    base, models, problem = toy
    plan = learn_adamerging(base, models, problem, steps=2)
    with pytest.raises(PlanMismatchError, match="3 task model"):
        plan.merge(base, models[:2])
    other_base, other_models = fusion_toy.checkpoints(seed=5)
    with pytest.raises(PlanMismatchError, match="not the models it was learned for"):
        plan.merge(other_base, other_models)
    with pytest.raises(PlanMismatchError, match="not the models it was learned for"):
        plan.merge(base, [models[1], models[0], models[2]])  # same models, other order
    plan.verify = False
    plan.merge(base, [models[1], models[0], models[2]])
    wide = {**base, "layers.0.weight": torch.zeros(12, 7)}
    with pytest.raises(PlanMismatchError, match=r"shape \[12, 7\]"):
        plan.merge(wide, models)


# -- bad input --------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(toy) -> None:
    base, models, problem = toy
    bad = _clone(models[1])
    bad["layers.1.weight"] = torch.zeros(12, 13)
    with pytest.raises(ShapeMismatchError, match=r"'layers.1.weight' has shape \[12, 13\] in task model 2"):
        DifferentiableMerge(base, [models[0], bad, models[2]], problem)
    with pytest.raises(RecipeError, match="2 task\\(s\\) .* for 3 task model"):
        DifferentiableMerge(base, models, fusion_toy.too_few_heads())
    with pytest.raises(RecipeError, match="no checkpoint tensor is a parameter"):
        DifferentiableMerge(base, models, FusionProblem(problem.model, problem.tasks, prefix="encoder."))
    with pytest.raises(RecipeError, match="cannot import 'tests.nope'"):
        load_entry_point("tests.nope:problem")
    with pytest.raises(RecipeError, match="has no function 'nothing'"):
        load_entry_point("tests.support.fusion_toy:nothing")
    with pytest.raises(RecipeError, match="expected a FusionProblem"):
        load_entry_point("tests.support.fusion_toy:not_a_problem")
    with pytest.raises(RecipeError, match="package.module:function"):
        load_entry_point("tests.support.fusion_toy")
    with pytest.raises(RecipeError, match="coefficients"):
        learn_adamerging(base, models, problem, coefficients="block")
    with pytest.raises(RecipeError, match="temperature"):
        learn_concrete_task_arithmetic(base, models, problem, temperature=0.0)
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="no CUDA device"):
            learn_adamerging(base, models, problem, device="cuda")


# -- through the engine and the CLI -----------------------------------------------------------------


def _write_toy(tmp_path: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    base, models = fusion_toy.checkpoints(seed)
    cfg = {"architectures": ["Toy"]}
    b = write_checkpoint(tmp_path / f"base{seed}", base, config=cfg)
    return b, [write_checkpoint(tmp_path / f"ft{seed}_{i}", m, config=cfg) for i, m in enumerate(models)]


def _recipe(method: str, base: Path, models: list[Path], **params) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": params,
        "dtype": "float32",
        "seed": 1,
    }


@pytest.mark.parametrize(
    "method,params",
    [
        ("adamerging", {"coefficients": "task", "steps": 4, "lr": 0.05}),
        ("concrete_task_arithmetic", {"steps": 4, "lr": 0.05, "readout": "expected"}),
        ("concrete_adamerging", {"mask_steps": 3, "steps": 3, "granularity": "row"}),
    ],
)
def test_engine_learns_writes_the_plan_and_reruns_from_it(
    tmp_path: Path, digest, method: str, params: dict
) -> None:
    base, models = _write_toy(tmp_path)
    before = [digest(p) for p in (base, *models)]
    events: list[Progress] = []
    run_merge(
        _recipe(method, base, models, entry_point=ENTRY, **params),
        tmp_path / "out",
        MergeOptions(allow_code=True, workers=2),
        progress=events.append,
    )
    steps = [e.current for e in events if e.phase == "planning" and "step" in e.current]
    assert steps and f"{method} " in steps[-1] and "loss" in steps[-1]
    assert [digest(p) for p in (base, *models)] == before
    out = load_file(tmp_path / "out" / "model.safetensors")
    plan = FusionPlan.load(tmp_path / "out" / "fusion_plan")
    assert plan.method == method and plan.n_tasks == 3
    # the library applies the plan to the same bytes
    lib = plan.merge(
        load_file(base / "model.safetensors"), [load_file(m / "model.safetensors") for m in models]
    )
    assert set(lib) == set(out) and all(torch.equal(lib[k], out[k]) for k in out)
    # a re-run from the saved plan needs no code and no data, and writes the same bytes
    run_merge(
        _recipe(method, base, models, plan=str(tmp_path / "out" / "fusion_plan")),
        tmp_path / "again",
        MergeOptions(workers=1),
    )
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors"
    ).read_bytes()


def test_cli_needs_allow_code_and_rejects_bad_recipes(tmp_path: Path) -> None:
    base, models = _write_toy(tmp_path)
    recipe = tmp_path / "r.json"

    def run(r: dict, *flags: str, out: str = "out"):
        recipe.write_text(json.dumps(r))
        return CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / out), *flags])

    r = run(_recipe("adamerging", base, models, entry_point=ENTRY, steps=2))
    assert r.exit_code == 2 and "--allow-code" in r.output and not (tmp_path / "out").exists()
    r = run(_recipe("adamerging", base, models, entry_point=ENTRY, steps=2), "--allow-code")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "fusion_plan" / "plan.json").exists()
    cases = [
        (_recipe("adamerging", base, models, entry_point="tests.nope:problem"), "cannot import 'tests.nope'"),
        (_recipe("adamerging", base, models, entry_point="tests.support.fusion_toy:too_few_heads"), "2 task(s)"),
        (_recipe("adamerging", base, models), "exactly one of the parameters 'entry_point'"),
        (
            _recipe(
                "adamerging", base, models, entry_point=ENTRY, plan=str(tmp_path / "out" / "fusion_plan")
            ),
            "exactly one",
        ),
        (
            _recipe("concrete_adamerging", base, models, plan=str(tmp_path / "out" / "fusion_plan")),
            "learned by 'adamerging'",
        ),
        (_recipe("adamerging", base, models[:2], plan=str(tmp_path / "out" / "fusion_plan")), "3 task model"),
    ]
    other_base, other_models = _write_toy(tmp_path, seed=9)
    cases.append(
        (
            _recipe("adamerging", other_base, other_models, plan=str(tmp_path / "out" / "fusion_plan")),
            "not the models it was learned for",
        )
    )
    for i, (rec, needle) in enumerate(cases):
        r = run(rec, "--allow-code", out=f"bad{i}")
        assert r.exit_code == 2, (needle, r.output)
        assert needle in r.output and r.output.count("\n") == 1, (needle, r.output)
        assert not (tmp_path / f"bad{i}").exists()
        assert not list(tmp_path.glob(f"bad{i}.partial-*"))


def test_engine_refuses_code_by_default_and_task_shapes_are_checked(tmp_path: Path) -> None:
    base, models = _write_toy(tmp_path)
    with pytest.raises(CodeRefusedError, match="allow-code"):
        run_merge(_recipe("concrete_task_arithmetic", base, models, entry_point=ENTRY), tmp_path / "o")
    assert CodeRefusedError.grpc_code == "FAILED_PRECONDITION"
    sd = load_file(models[1] / "model.safetensors")
    sd["layers.0.weight"] = torch.zeros(12, 5)
    bad = write_checkpoint(tmp_path / "bad", sd)
    with pytest.raises(ShapeMismatchError, match="layers.0.weight"):
        run_merge(
            _recipe("adamerging", base, [models[0], bad, models[2]], entry_point=ENTRY),
            tmp_path / "o",
            MergeOptions(allow_code=True),
        )
    assert not (tmp_path / "o").exists()


def test_cancel_during_learning_writes_nothing(tmp_path: Path) -> None:
    base, models = _write_toy(tmp_path)
    cancel = threading.Event()

    def progress(p: Progress) -> None:
        if "step 3/" in p.current:
            cancel.set()

    with pytest.raises(MergeCancelled):
        run_merge(
            _recipe("adamerging", base, models, entry_point=ENTRY, steps=1000),
            tmp_path / "o",
            MergeOptions(allow_code=True),
            progress=progress,
            cancel=cancel,
        )
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial-*"))


# -- the mechanism, with an oracle objective ---------------------------------------------------------


@pytest.mark.slow
def test_labelled_loss_mask_beats_task_arithmetic_on_held_out_digits() -> None:
    """Research note §3.5, test 1: with cross-entropy on a labelled validation split plugged in place of
    the entropy, the learned Concrete mask beats TA(0.3) on the held-out test split (digits-4)."""
    from examples.concrete_merging import DigitsSetup, SetupConfig

    setup = DigitsSetup.build(SetupConfig.unit())
    ta = setup.evaluate(setup.task_arithmetic(0.3))
    problem = setup.problem(objective="labelled")
    plan = learn_concrete_task_arithmetic(
        setup.base, setup.models, problem, steps=150, lr=0.05, readout="expected", batch_size=64
    )
    learned = setup.evaluate(plan.merge(setup.base, setup.models))
    assert learned["mean"] - ta["mean"] >= 5.0, (ta, learned)
    # and it is the mask that does it: the same plan with its mask replaced by ones is TA
    plan.mask = {k: torch.ones(()) for k in plan.keys}
    assert setup.evaluate(plan.merge(setup.base, setup.models))["mean"] == pytest.approx(ta["mean"], abs=0.01)


def test_service_refuses_entry_points_and_applies_saved_plans(tmp_path: Path) -> None:
    import yaml

    from service.client import RemoteError, state_name
    from tests.support.service import ServerProcess

    root = tmp_path / "root"
    base, models = _write_toy(root)
    sd_base, sd_models = fusion_toy.checkpoints()
    plan = learn_concrete_task_arithmetic(sd_base, sd_models, fusion_toy.problem(), steps=3, lr=0.05)
    plan.save(root / "plan")
    srv = ServerProcess(tmp_path / "data", [root])
    srv.start()
    try:
        c = srv.client()
        c.wait_ready()
        with pytest.raises(RemoteError) as e:
            c.create_merge_job(
                yaml.safe_dump(_recipe("concrete_task_arithmetic", base, models, entry_point=ENTRY)),
                output_path="out/code",
            )
        assert e.value.code == "FAILED_PRECONDITION" and "names Python code" in e.value.message
        resp = c.create_merge_job(
            yaml.safe_dump(_recipe("concrete_task_arithmetic", base, models, plan=str(root / "plan"))),
            output_path="out/plan",
        )
        job = c.wait(resp.job.name, timeout=60)
        assert state_name(job.state) == "SUCCEEDED", job.error
        out = load_file(root / "out" / "plan" / "model.safetensors")
        want = plan.merge(sd_base, sd_models)
        assert all(torch.equal(out[k], want[k]) for k in want)
        assert (root / "out" / "plan" / "fusion_plan" / "plan.json").exists()
        c.close()
    finally:
        srv.stop()
    assert not (root / "out" / "code").exists()
