"""RegMean and Fisher merging: the closed forms by hand, the statistics, plans, the engine and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from merge.errors import CodeRefusedError, NonFiniteError, RecipeError, ShapeMismatchError, WeightsmithError
from merge.execute import Progress, run_merge
from merge.methods import get_method
from merge.methods._fusion import FusionProblem, FusionTask
from merge.methods._fusion_plan import PlanMismatchError
from merge.methods.fisher import FisherPlan, _PerExample, compute_fisher, fisher_average, learn_fisher
from merge.methods.regmean import RegMeanPlan, compute_grams, learn_regmean, regmean_weight
from merge.methods.runner import derive_seed
from merge.plan import MergeOptions
from service.cli.main import main
from tests.conftest import write_checkpoint
from tests.support import fusion_toy

ENTRY = "tests.support.fusion_toy:problem"
LABELLED = "tests.merge.test_regmean_fisher:labelled_problem"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (a busy 2-core machine: OpenMP spinning made such tests 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def labelled_problem(device: str = "cpu") -> FusionProblem:
    """fusion_toy's problem with seeded labels in [0, 4): batches are (inputs, labels)."""
    p = fusion_toy.problem()
    g = torch.Generator().manual_seed(11)
    tasks = [
        FusionTask(t.name, (t.data, torch.randint(0, 4, (len(t.data),), generator=g)), head=t.head)
        for t in p.tasks
    ]
    return FusionProblem(p.model, tasks)


class _Branchy(fusion_toy.Toy):
    """The toy with data-dependent Python control flow: vmap cannot run it (the per-example loop can)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().sum()) >= 0:
            return super().forward(x)
        return x  # pragma: no cover


@pytest.fixture
def toy() -> tuple[dict, list[dict]]:
    return fusion_toy.checkpoints()


# -- RegMean: the closed form --------------------------------------------------------------------------


W1, W2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])
G1, G2 = torch.tensor([[2.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])


def test_regmean_closed_form_by_hand_on_a_2x2_example() -> None:
    # α = 1: A = G1 + G2 = [[3, 1], [1, 3]], B = G1 W1ᵀ + G2 W2ᵀ = [4, 3] + [3, 0] = [7, 3],
    # A⁻¹ = [[3, −1], [−1, 3]] / 8, so Wᵀ = [21 − 3, −7 + 9] / 8 = [2.25, 0.25]
    got = regmean_weight([W1, W2], [G1, G2], alpha=1.0)
    assert torch.allclose(got, torch.tensor([[2.25, 0.25]]), atol=1e-6)
    # it is the least-squares fit of both models' outputs on inputs whose Grams are G1, G2
    x1 = torch.linalg.cholesky(G1).T  # x1ᵀ x1 = G1
    x2 = torch.linalg.cholesky(G2).T
    xs, ys = torch.cat([x1, x2]), torch.cat([x1 @ W1.T, x2 @ W2.T])
    assert torch.allclose(torch.linalg.lstsq(xs, ys).solution.T, got, atol=1e-5)
    # α = 0.5: G̃1 = [[2, .5], [.5, 1]], G̃2 = G2; A = [[3, .5], [.5, 3]], B = [3, 2.5] + [3, 0] = [6, 2.5],
    # Wᵀ = [[3, −.5], [−.5, 3]] [6, 2.5] / 8.75 = [16.75, 4.5] / 8.75
    got = regmean_weight([W1, W2], [G1, G2], alpha=0.5)
    assert torch.allclose(got, torch.tensor([[16.75 / 8.75, 4.5 / 8.75]]), atol=1e-6)


def test_regmean_alpha_zero_is_a_diagonal_gram_weighting() -> None:
    # by hand: column 0: (2·1 + 1·3) / 3, column 1: (1·2 + 2·0) / 3
    got = regmean_weight([W1, W2], [G1, G2], alpha=0.0)
    assert torch.allclose(got, torch.tensor([[5 / 3, 2 / 3]]), atol=1e-6)
    # and on random PSD Grams: W[:, j] = Σ_i G_i[j, j] W_i[:, j] / Σ_i G_i[j, j]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20, 5, generator=g) for _ in range(3)]
    grams = torch.stack([x.T @ x for x in xs])
    ws = [torch.randn(4, 5, generator=g) for _ in range(3)]
    d = grams.diagonal(dim1=1, dim2=2)  # (3, 5)
    want = sum(d[i] * ws[i] for i in range(3)) / d.sum(0)
    assert torch.allclose(regmean_weight(ws, grams, alpha=0.0), want, atol=1e-5)


def test_regmean_identity_grams_average_and_one_model_is_itself() -> None:
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(6, 4, generator=g) for _ in range(3)]
    eye = torch.eye(4).expand(3, 4, 4)
    for alpha in (1.0, 0.5, 0.0):
        assert torch.allclose(regmean_weight(ws, eye, alpha=alpha), sum(ws) / 3, atol=1e-6)
    # any Grams scaled equally are the same merge (only their ratios matter)
    x = torch.randn(30, 4, generator=g)
    same = (x.T @ x).expand(3, 4, 4)
    assert torch.allclose(regmean_weight(ws, same, alpha=1.0), sum(ws) / 3, atol=1e-5)
    # one model: itself, whatever its Gram and α
    for alpha in (1.0, 0.3):
        assert torch.allclose(regmean_weight([ws[0]], (x.T @ x)[None], alpha=alpha), ws[0], atol=1e-5)


def test_regmean_unreached_columns_are_averaged_and_singular_grams_are_an_error() -> None:
    g1 = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])  # column 1 never active
    g2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    wa, wb = torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[3.0, -1.0, 0.0]])
    got = regmean_weight([wa, wb], [g1, g2], alpha=0.5)
    assert got[0, 1].item() == pytest.approx(2.0)  # the average of 5 and −1
    # columns 0 and 2 are what the 2x2 problem without column 1 gives
    sub = regmean_weight([wa[:, [0, 2]], wb[:, [0, 2]]], [g1[[0, 2]][:, [0, 2]], g2[[0, 2]][:, [0, 2]]], alpha=0.5)
    assert torch.allclose(got[:, [0, 2]], sub, atol=1e-6)
    # α = 1 on rank-deficient Grams: a clear error; a ridge pulls toward the average instead
    x = torch.tensor([[1.0, 1.0]])
    rank1 = (x.T @ x).expand(2, 2, 2)
    with pytest.raises(RecipeError, match="singular.*alpha < 1 or ridge > 0"):
        regmean_weight([W1, W2], rank1, alpha=1.0)
    r = regmean_weight([W1, W2], rank1, alpha=1.0, ridge=1e-3)
    assert torch.allclose(r, (W1 + W2) / 2, atol=1e-3)


def test_regmean_bad_input_is_one_clear_line() -> None:
    with pytest.raises(ShapeMismatchError, match=r"'fc.weight' of model 2 has shape \[1, 3\], expected \[1, 2\]") as e:
        regmean_weight([W1, torch.zeros(1, 3)], [G1, G2], name="fc.weight")
    assert "\n" not in str(e.value)
    with pytest.raises(ShapeMismatchError, match="2 weights .* for 3 Gram"):
        regmean_weight([W1, W2], torch.eye(2).expand(3, 2, 2))
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        regmean_weight([W1, W2], [G1, torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])])
    with pytest.raises(RecipeError, match="alpha"):
        regmean_weight([W1, W2], [G1, G2], alpha=1.5)


# -- Fisher: the closed form ---------------------------------------------------------------------------


def test_fisher_average_by_hand() -> None:
    t1, t2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    f1, f2 = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    # (1·1 + 3·3) / 4 = 2.5 ; (3·2 + 1·(−2)) / 4 = 1
    assert torch.allclose(fisher_average([t1, t2], [f1, f2]), torch.tensor([2.5, 1.0]), atol=1e-6)
    # λ = (2, 1): (2·1 + 3·3) / 5 = 2.2 ; (2·3·2 − 2) / 7 = 10/7
    got = fisher_average([t1, t2], [f1, f2], weights=[2.0, 1.0])
    assert torch.allclose(got, torch.tensor([2.2, 10 / 7]), atol=1e-6)
    # equal Fishers: the (λ-weighted) average; any common scale does not matter
    assert torch.allclose(fisher_average([t1, t2], [f1, f1]), (t1 + t2) / 2, atol=1e-6)
    assert torch.allclose(fisher_average([t1, t2], [7 * f2, 7 * f2], weights=[3, 1]), (3 * t1 + t2) / 4, atol=1e-6)
    # one Fisher zero: the other model, within ε
    eps = 1e-6
    got = fisher_average([t1, t2], [torch.zeros(2), f2], epsilon=eps)
    assert torch.allclose(got, t2, atol=10 * eps)
    assert not torch.equal(got, t2)  # the floor is there
    # all zero: the floor makes it the average
    assert torch.allclose(fisher_average([t1, t2], [torch.zeros(2)] * 2), (t1 + t2) / 2, atol=1e-6)


def test_fisher_bad_input_is_one_clear_line() -> None:
    t = [torch.ones(2), torch.zeros(2)]
    with pytest.raises(NonFiniteError, match="Fisher of 'w' for task model 2 contains NaN or Inf") as e:
        fisher_average(t, [torch.ones(2), torch.tensor([1.0, float("inf")])], name="w")
    assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="negative"):
        fisher_average(t, [torch.ones(2), -torch.ones(2)])
    with pytest.raises(ShapeMismatchError, match=r"model 2 has shape \[3\]"):
        fisher_average([torch.ones(2), torch.ones(3)], [torch.ones(2), torch.ones(3)])
    with pytest.raises(RecipeError, match="epsilon"):
        fisher_average(t, [torch.ones(2)] * 2, epsilon=0.0)
    with pytest.raises(RecipeError, match="sum to 0"):
        fisher_average(t, [torch.ones(2)] * 2, weights=[0.0, 0.0])
    with pytest.raises(RecipeError, match="3 per-model weights for 2"):
        fisher_average(t, [torch.ones(2)] * 2, weights=[1.0, 1.0, 1.0])


# -- the statistics on the toy problem -----------------------------------------------------------------


def test_grams_are_the_inputs_of_each_linear_with_each_models_weights(toy) -> None:
    _, models = toy
    problem = fusion_toy.problem()
    grams, counts, _ = compute_grams(models, problem, num_examples=0, batch_size=7)
    assert set(grams) == {"layers.0.weight", "layers.1.weight"}
    assert counts.tolist() == [[40, 40]] * 3
    for i, (m, x) in enumerate(zip(models, fusion_toy.data(), strict=True)):
        h = F.relu(F.linear(x, m["layers.0.weight"], m["layers.0.bias"]))
        assert torch.allclose(grams["layers.0.weight"][i].float(), x.T @ x / 40, atol=1e-5)
        assert torch.allclose(grams["layers.1.weight"][i].float(), h.T @ h / 40, atol=1e-5)
    # a budget: a seeded subset of rows; keys restricts the layers
    g2, c2, _ = compute_grams(models, problem, num_examples=10, keys=r"layers\.1")
    assert list(g2) == ["layers.1.weight"] and c2.tolist() == [[10]] * 3
    # nothing of the caller's was modified and no hook is left behind
    assert all(not mod._forward_hooks for mod in problem.model.modules())


def test_fisher_is_the_mean_squared_per_example_gradient(toy) -> None:
    _, models = toy
    problem = labelled_problem()
    fishers, _, details = compute_fisher(models, problem, labels="data", num_examples=0, batch_size=16)
    assert details["task0"]["labels"] == ["data"] and details["task0"]["per_example"] == "vmap"
    # by hand, one example at a time with autograd
    t = 1
    m, (x, y), head = models[t], problem.tasks[t].data, problem.tasks[t].head
    module = fusion_toy.Toy()
    params = {k: v.clone().requires_grad_(True) for k, v in m.items()}
    want = {k: torch.zeros_like(v) for k, v in m.items()}
    for j in range(len(x)):
        lp = F.log_softmax(head(torch.func.functional_call(module, params, (x[j : j + 1],))), -1)[0, y[j]]
        for k, gk in zip(params, torch.autograd.grad(lp, list(params.values())), strict=True):
            want[k] += gk.square() / len(x)
    for k in want:
        assert torch.allclose(fishers[k][t], want[k], rtol=1e-4, atol=1e-7), k
    # exact: Σ_c p(c|x) g_c² (by hand for one tensor), and sampling is seeded
    exact, _, d = compute_fisher(models, problem, labels="exact", keys="norm.bias", num_examples=8)
    assert d["task1"]["labels"] == ["exact"]
    sub = torch.randperm(40, generator=torch.Generator().manual_seed(derive_seed(0, "fisher:rows:task1")))[:8]
    want_e = torch.zeros(12)
    for j in sub.tolist():
        p = F.softmax(head(torch.func.functional_call(module, params, (x[j : j + 1],))), -1)[0].detach()
        for c in range(4):
            lp = F.log_softmax(head(torch.func.functional_call(module, params, (x[j : j + 1],))), -1)[0, c]
            (gk,) = torch.autograd.grad(lp, [params["norm.bias"]])
            want_e += p[c] * gk.square() / 8
    assert torch.allclose(exact["norm.bias"][1], want_e, rtol=1e-4, atol=1e-7)
    a, _, da = compute_fisher(models, fusion_toy.problem(), keys="norm", num_examples=8, seed=3)
    b, _, _ = compute_fisher(models, fusion_toy.problem(), keys="norm", num_examples=8, seed=3)
    c, _, _ = compute_fisher(models, fusion_toy.problem(), keys="norm", num_examples=8, seed=4)
    assert da["task0"]["labels"] == ["sample"]  # auto, unlabelled data: y ~ p(y|x)
    assert torch.equal(a["norm.weight"], b["norm.weight"]) and not torch.equal(a["norm.weight"], c["norm.weight"])


def test_per_example_loop_fallback_equals_vmap(toy) -> None:
    _, models = toy
    ref, _, _ = compute_fisher(models, labelled_problem(), labels="data", num_examples=6)
    p = labelled_problem()
    p.model = _Branchy()
    got, _, d = compute_fisher(models, p, labels="data", num_examples=6)
    assert d["task0"]["per_example"].startswith("loop")
    assert all(torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-7) for k in ref)
    assert _PerExample  # the class the fallback lives in


# -- plans ---------------------------------------------------------------------------------------------


def test_plans_merge_save_load_and_refuse_other_models(toy, tmp_path: Path) -> None:
    base, models = toy
    rp = learn_regmean(base, models, fusion_toy.problem(), num_examples=20)
    fp = learn_fisher(base, models, labelled_problem(), num_examples=8, normalize=True)
    for plan, cls in ((rp, RegMeanPlan), (fp, FisherPlan)):
        out = plan.merge(base, models)
        # what the statistics do not cover is averaged (biases and the LayerNorm for RegMean)
        if cls is RegMeanPlan:
            assert torch.allclose(out["layers.0.bias"], sum(m["layers.0.bias"] for m in models) / 3)
            assert not torch.allclose(out["layers.0.weight"], sum(m["layers.0.weight"] for m in models) / 3)
        plan.save(tmp_path / cls.__name__)
        card = json.loads((tmp_path / cls.__name__ / "plan.json").read_text())
        assert card["method"] == plan.method and card["task_names"] == ["task0", "task1", "task2"]
        back = cls.load(tmp_path / cls.__name__)
        again = back.merge(base, models)
        assert all(torch.equal(out[k], again[k]) for k in out)
        with pytest.raises(PlanMismatchError, match="3 task model"):
            back.merge(base, models[:2])
        with pytest.raises(PlanMismatchError, match="not the models it was computed on"):
            back.merge(base, [models[1], models[0], models[2]])
    # a plan re-merges with other hyperparameters and no data
    a0 = dataclasses.replace(rp, alpha=0.0).merge(base, models)
    assert not torch.equal(a0["layers.1.weight"], rp.merge(base, models)["layers.1.weight"])
    # the wrong kind of plan, and a corrupt one
    with pytest.raises(RecipeError, match="computed by 'regmean'; apply it with merge_method: regmean"):
        FisherPlan.load(tmp_path / "RegMeanPlan")
    raw = bytearray((tmp_path / "FisherPlan" / "plan.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "FisherPlan" / "plan.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsmithError, match="SHA-256"):
        FisherPlan.load(tmp_path / "FisherPlan")
    # task arithmetic for the other tensors needs the base
    ta = dataclasses.replace(rp, others="task_arithmetic", lambda_=0.5)
    out = ta.merge(base, models)
    want = base["norm.bias"] + 0.5 * sum(m["norm.bias"] - base["norm.bias"] for m in models)
    assert torch.allclose(out["norm.bias"], want, atol=1e-6)
    with pytest.raises(RecipeError, match="needs a base_model"):
        ta.merge(None, models)


def test_plans_refuse_non_finite_statistics() -> None:
    with pytest.raises(NonFiniteError, match="Fisher of 'w' for task model 1"):
        FisherPlan(keys=["w"], shapes={"w": (2,)}, fishers={"w": torch.tensor([[float("nan"), 1.0]])})
    with pytest.raises(NonFiniteError, match="Gram matrices of 'w'"):
        RegMeanPlan(keys=["w"], shapes={"w": (1, 2)}, grams={"w": torch.full((1, 2, 2), float("inf"))})
    with pytest.raises(ShapeMismatchError, match=r"Grams of 'w' have shape \[1, 3, 3\]"):
        RegMeanPlan(keys=["w"], shapes={"w": (1, 2)}, grams={"w": torch.ones(1, 3, 3)})


def test_statistics_bad_input(toy) -> None:
    base, models = toy
    bad = dict(models[1])
    bad["layers.1.weight"] = torch.zeros(12, 13)
    with pytest.raises(ShapeMismatchError, match=r"'layers.1.weight' has shape \[12, 13\] in task model 2"):
        learn_regmean(base, [models[0], bad, models[2]], fusion_toy.problem())
    with pytest.raises(RecipeError, match="2 task\\(s\\) .* for 3 task model"):
        learn_fisher(base, models, fusion_toy.too_few_heads())
    with pytest.raises(RecipeError, match="labels: data, but task 'task0' gives no labels"):
        learn_fisher(base, models, fusion_toy.problem(), labels="data")
    with pytest.raises(RecipeError, match="parameter 'labels'"):
        learn_fisher(base, models, fusion_toy.problem(), labels="true")
    with pytest.raises(RecipeError, match="needs a base_model"):
        learn_regmean(None, models, fusion_toy.problem(), others="task_arithmetic")
    tasks = [FusionTask(f"t{i}", x) for i, x in enumerate(fusion_toy.data())]
    with pytest.raises(RecipeError, match="no checkpoint tensor is a tensor of the module"):
        learn_regmean(base, models, FusionProblem(fusion_toy.Toy(), tasks, prefix="enc."))
    norm_only = torch.nn.Module()
    norm_only.norm = torch.nn.LayerNorm(12)
    with pytest.raises(RecipeError, match="no nn.Linear of the module has its weight in the checkpoints"):
        learn_regmean(base, models, FusionProblem(norm_only, tasks))


# -- through the engine and the CLI --------------------------------------------------------------------


def _write_toy(tmp_path: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    base, models = fusion_toy.checkpoints(seed)
    cfg = {"architectures": ["Toy"]}
    b = write_checkpoint(tmp_path / f"base{seed}", base, config=cfg)
    return b, [write_checkpoint(tmp_path / f"ft{seed}_{i}", m, config=cfg) for i, m in enumerate(models)]


def _recipe(method: str, base: Path | None, models: list[Path], **params) -> dict:
    r = {"merge_method": method, "models": [{"model": str(m)} for m in models], "parameters": params,
         "dtype": "float32", "seed": 1}
    if base is not None:
        r["base_model"] = str(base)
    return r


@pytest.mark.parametrize(
    "method,params,with_base",
    [
        ("regmean", {"entry_point": ENTRY, "alpha": 0.5, "num_examples": 16}, False),
        ("regmean", {"entry_point": ENTRY, "others": "task_arithmetic", "lambda": 0.4, "num_examples": 16}, True),
        ("fisher", {"entry_point": LABELLED, "num_examples": 8, "weight": 2.0}, True),
    ],
)
def test_engine_computes_writes_the_plan_and_reruns_from_it(tmp_path: Path, method, params, with_base) -> None:
    base, models = _write_toy(tmp_path)
    events: list[Progress] = []
    run_merge(_recipe(method, base if with_base else None, models, **params), tmp_path / "out",
              MergeOptions(allow_code=True, workers=2), progress=events.append)
    assert any(f"{method} " in e.current and "task 'task2'" in e.current for e in events if e.phase == "planning")
    out = load_file(tmp_path / "out" / "model.safetensors")
    cls = RegMeanPlan if method == "regmean" else FisherPlan
    plan = cls.load(tmp_path / "out" / "fusion_plan")
    assert plan.method == method and plan.n_tasks == 3
    sd_base = load_file(base / "model.safetensors")
    sds = [load_file(m / "model.safetensors") for m in models]
    lib = plan.merge(sd_base if with_base else None, sds)
    assert set(lib) == set(out) and all(torch.equal(lib[k], out[k]) for k in out)
    if method == "fisher":
        assert plan.weights == [2.0, 2.0, 2.0]
    # the same merge straight from the library call (the engine adds nothing of its own)
    learn = learn_regmean if method == "regmean" else learn_fisher
    rename = {"lambda": "lambda_", "weight": "weights"}
    kw = {rename.get(k, k): v for k, v in params.items() if k != "entry_point"}
    problem = fusion_toy.problem() if params["entry_point"] == ENTRY else labelled_problem()
    direct = learn(sd_base if with_base else None, sds, problem, seed=1, **kw).merge(
        sd_base if with_base else None, sds)
    assert all(torch.equal(direct[k], out[k]) for k in out)
    # a re-run from the saved plan needs no code and no data, and writes the same bytes
    run_merge(_recipe(method, base if with_base else None, models, plan=str(tmp_path / "out" / "fusion_plan")),
              tmp_path / "again", MergeOptions(workers=1))
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors").read_bytes()


def test_per_model_weights_of_a_whole_model_method_reach_it(tmp_path: Path) -> None:
    """``models[i].parameters.weight`` is model i's λ_i (the engine passes one value per non-base model)."""
    base, models = _write_toy(tmp_path)
    r = _recipe("fisher", base, models, entry_point=LABELLED, num_examples=8)
    for m, w in zip(r["models"], (3.0, 1.0, 0.5), strict=True):
        m["parameters"] = {"weight": w}
    run_merge(r, tmp_path / "out", MergeOptions(allow_code=True, workers=1))
    assert FisherPlan.load(tmp_path / "out" / "fusion_plan").weights == [3.0, 1.0, 0.5]


def test_engine_and_cli_refuse_bad_recipes(tmp_path: Path) -> None:
    base, models = _write_toy(tmp_path)
    with pytest.raises(CodeRefusedError, match="allow-code"):
        run_merge(_recipe("regmean", base, models, entry_point=ENTRY), tmp_path / "o")
    recipe = tmp_path / "r.json"

    def run(r: dict, *flags: str, out: str = "out"):
        recipe.write_text(json.dumps(r))
        return CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / out), *flags])

    r = run(_recipe("fisher", base, models, entry_point=ENTRY, num_examples=4), "--allow-code")
    assert r.exit_code == 0, r.output
    cases = [
        (_recipe("regmean", base, models), "exactly one of the parameters 'entry_point'"),
        (_recipe("regmean", base, models, entry_point=ENTRY, alpha=2.0), "alpha"),
        (_recipe("fisher", base, models, entry_point=ENTRY, labels="data"), "gives no labels"),
        (_recipe("regmean", base, models, plan=str(tmp_path / "out" / "fusion_plan")), "computed by 'fisher'"),
        (_recipe("adamerging", base, models, plan=str(tmp_path / "out" / "fusion_plan")), "not a weightsmith fusion"),
        (_recipe("fisher", base, models[:2], plan=str(tmp_path / "out" / "fusion_plan")), "3 task model"),
    ]
    for i, (rec, needle) in enumerate(cases):
        r = run(rec, "--allow-code", out=f"bad{i}")
        assert r.exit_code == 2, (needle, r.output)
        assert needle in r.output and r.output.count("\n") == 1, (needle, r.output)
        assert not (tmp_path / f"bad{i}").exists()


def test_methods_are_registered_with_their_schema() -> None:
    rm, fi = get_method("regmean"), get_method("fisher")
    assert rm.kind == fi.kind == "whole_model" and rm.base == fi.base == "optional"
    assert rm.params["entry_point"].code and rm.params["plan"].path and rm.params["alpha"].bounds == (0.0, 1.0)
    assert fi.params["weight"].per_model and "2111.09832" in fi.url and "2212.09849" in rm.url
    for spec in (rm, fi):
        spec.json_schema()  # the pydantic schema builds
        assert {p["name"] for p in spec.describe()["params"]} >= {"entry_point", "plan", "num_examples", "keys"}
