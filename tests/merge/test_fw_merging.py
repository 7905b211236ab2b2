"""FW-Merging (merge.methods.fw_merging): Frank-Wolfe steps by hand, convergence, streaming, the engine, bad input."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import merge.methods.fw_merging as fwm
from merge.checkpoint import Checkpoint
from merge.errors import (
    CodeRefusedError,
    MergeCancelled,
    MissingTensorError,
    NonFiniteError,
    RecipeError,
    ShapeMismatchError,
)
from merge.execute import Progress, run_merge
from merge.methods import get_method
from merge.methods._fusion import FusionProblem, FusionTask
from merge.methods._fusion_plan import FusionPlan
from merge.methods.fw_merging import fw_merge, learn_fw_merging
from merge.plan import MergeOptions
from tests.conftest import write_checkpoint
from tests.support import fusion_toy

ENTRY = "tests.support.fusion_toy:problem"  # three target tasks; the pool's size is unrelated


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a quadratic in a small weight space --------------------------------------------------------------


class Point(nn.Module):
    """The weights are the output: f(w) is a function of the tensors themselves."""

    def __init__(self, **shapes: int) -> None:
        super().__init__()
        for k, d in shapes.items():
            self.register_parameter(k, nn.Parameter(torch.zeros(d)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())


def quadratic(**targets: list[float]) -> FusionProblem:
    """f(w) = Σ_k ‖w_k[:len(target_k)] − target_k‖² (coordinates past a target's length do not matter)."""
    tgt = {k: torch.tensor(v) for k, v in targets.items()}
    shapes = {k: len(v) for k, v in targets.items()}

    def loss(out: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        return sum(((out[k][: len(t)] - t) ** 2).sum() for k, t in tgt.items())

    return FusionProblem(Point(**shapes), [FusionTask("q", torch.zeros(1, 1), loss=loss)])


def quadratic3(target: list[float]) -> FusionProblem:
    """A 3-D weight w whose third coordinate the objective ignores (∂f/∂w_3 = 0)."""
    tgt = torch.tensor(target)

    def loss(out: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        return ((out["w"][:2] - tgt) ** 2).sum()

    return FusionProblem(Point(w=3), [FusionTask("q", torch.zeros(1, 1), loss=loss)])


TAUS = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
W_STAR = [0.3, 0.1]  # = 0.5 τ_1 + 0.3 τ_2 + 0.2 τ_3: inside the hull, barycentric coordinates unique


def _pool(taus: list[list[float]], key: str = "w") -> tuple[dict, list[dict]]:
    return {key: torch.zeros(len(taus[0]))}, [{key: torch.tensor(t)} for t in taus]


def test_two_steps_by_hand() -> None:
    """Step 0 at θ_0 = 0: g = 2(0 − w*) = (−0.6, −0.2); ⟨τ_j, g⟩ = (−0.6, −0.2, 0.8): τ_1, γ_0 = 1.
    Step 1 at w = τ_1: g = (1.4, −0.2); ⟨τ_j, g⟩ = (1.4, −0.2, −1.2): τ_3, γ_1 = 2/3.
    So α = (1/3, 0, 2/3); f = 0.1 then 0.5; the gaps ⟨g, w − v⟩ are 0.6 and 1.4 + 1.2 = 2.6."""
    base, members = _pool(TAUS)
    plan = learn_fw_merging(base, members, quadratic(w=W_STAR), steps=2, lmo="task", include_base=False)
    assert plan.info["selected"] == [0, 2]
    assert plan.lambdas[:, 0].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3], abs=1e-6)
    hist = plan.info["history"]["loss"]
    assert hist["objective"]["values"] == pytest.approx([0.1, 0.5], abs=1e-6)
    assert hist["fw_gap"]["values"] == pytest.approx([0.6, 2.6], abs=1e-5)
    assert hist["step_size"]["values"] == pytest.approx([1.0, 2 / 3], abs=1e-6)
    merged, _ = fw_merge(base, members, quadratic(w=W_STAR), steps=2, lmo="task", include_base=False)
    assert merged["w"].tolist() == pytest.approx([-1 / 3, -2 / 3], abs=1e-6)


def test_line_search_step_by_hand() -> None:
    """From w = τ_1 towards τ_3: d = (−2, −1), f(γ) = (0.7 − 2γ)² + (γ + 0.1)², f'(γ) = 10γ − 2.6: γ = 0.26."""
    base, members = _pool(TAUS)
    plan = learn_fw_merging(
        base, members, quadratic(w=W_STAR), steps=2, lmo="task", include_base=False, step_rule="line_search"
    )
    # without θ_0 in the set, the first step lands on the vertex (γ_0 = 1) under the line search too
    assert plan.info["history"]["loss"]["step_size"]["values"] == pytest.approx([1.0, 0.26], abs=1e-6)
    assert plan.lambdas[:, 0].tolist() == pytest.approx([0.74, 0.0, 0.26], abs=1e-6)


@pytest.mark.parametrize("rule,steps,tol", [("line_search", 60, 1e-5), ("fw", 300, 1e-2)])
def test_converges_to_the_known_convex_combination(rule: str, steps: int, tol: float) -> None:
    base, members = _pool(TAUS)
    merged, plan = fw_merge(
        base, members, quadratic(w=W_STAR), steps=steps, lmo="task", include_base=False, step_rule=rule
    )
    alpha = plan.lambdas[:, 0]
    assert alpha.tolist() == pytest.approx([0.5, 0.3, 0.2], abs=tol)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-5)  # stays on the hull
    assert merged["w"].tolist() == pytest.approx(W_STAR, abs=tol)
    gaps = plan.info["history"]["loss"]["fw_gap"]
    assert gaps["last"] < gaps["first"] and gaps["last"] == pytest.approx(0.0, abs=10 * tol)
    if rule == "line_search":  # after the forced first step, the objective never goes up
        obj = plan.info["history"]["loss"]["objective"]["values"][1:]
        assert all(b <= a + 1e-9 for a, b in zip(obj, obj[1:], strict=False))


def test_scale_shrinks_the_set() -> None:
    """Vertices s·τ_j: with s = 0.5 the optimum (0.3, 0.1) is 0.5·(0.6, 0.2); α sums to s."""
    base, members = _pool(TAUS)
    merged, plan = fw_merge(
        base, members, quadratic(w=W_STAR), steps=60, lmo="task", include_base=False,
        step_rule="line_search", scale=0.5,
    )
    assert float(plan.lambdas[:, 0].sum()) == pytest.approx(0.5, abs=1e-5)
    assert merged["w"].tolist() == pytest.approx(W_STAR, abs=1e-5)


@pytest.mark.parametrize("oracle", ["inner", "cosine"])
@pytest.mark.parametrize("rule", ["fw", "line_search"])
def test_irrelevant_member_never_gets_weight(oracle: str, rule: str) -> None:
    """A member orthogonal to every gradient (it moves only the coordinate f ignores), however long
    and wherever it is listed, is never chosen: θ_0 (score 0) wins the tie, a helping member beats it."""
    taus = [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [0.0, 0.0, -3.0]]
    base, members = _pool(taus)
    merged, plan = fw_merge(base, members, quadratic3(W_STAR), steps=200, oracle=oracle, step_rule=rule)
    alpha = plan.lambdas[:, 0]
    assert alpha[0].item() == 0.0 and alpha[4].item() == 0.0
    assert merged["w"][2].item() == 0.0
    assert merged["w"][:2].tolist() == pytest.approx(W_STAR, abs=2e-2 if rule == "fw" else 1e-5)
    assert plan.info["members_used"] <= 3
    assert all(s not in (0, 4) for s in plan.info["selected"])


def test_layer_wise_lmo_picks_a_member_per_tensor() -> None:
    """f = ‖a − (1, 0)‖² + ‖b − (0, 1.5)‖²; τ_1 moves a only, τ_2 moves b only. At θ_0:
    g_a = (−2, 0), g_b = (0, −3). Layer-wise: a picks τ_1 (−2 < 0), b picks τ_2 (−3 < 0).
    Task-wise: ⟨τ_1, g⟩ = −2, ⟨τ_2, g⟩ = −3: τ_2 for both tensors."""
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    members = [
        {"a": torch.tensor([1.0, 0.0]), "b": torch.zeros(2)},
        {"a": torch.zeros(2), "b": torch.tensor([0.0, 1.0])},
    ]
    problem = quadratic(a=[1.0, 0.0], b=[0.0, 1.5])
    layer = learn_fw_merging(base, members, problem, steps=1, lmo="layer")
    assert layer.keys == ["a", "b"]
    assert layer.lambdas.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert layer.info["selected"] == [{"0": 1, "1": 1}]
    task = learn_fw_merging(base, members, problem, steps=1, lmo="task")
    assert task.lambdas.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert task.info["selected"] == [1]


def test_no_helping_member_keeps_the_base() -> None:
    """Every ⟨τ_j, g⟩ ≥ 0 at θ_0: with θ_0 among the vertices nothing is merged."""
    base, members = _pool([[-1.0, 0.0], [0.0, -2.0]])
    merged, plan = fw_merge(base, members, quadratic(w=[0.3, 0.1]), steps=5)
    assert plan.lambdas.abs().sum().item() == 0.0 and plan.info["members_used"] == 0
    assert merged["w"].tolist() == [0.0, 0.0]


# -- streaming: one member at a time ------------------------------------------------------------------


class Tracked(Mapping[str, torch.Tensor]):
    """A TensorSource that hands out copies and counts how many of the pool's tensors are alive."""

    live = 0
    peak = 0

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = sd

    def __getitem__(self, k: str) -> torch.Tensor:
        t = self.sd[k].clone()
        Tracked.live += 1
        Tracked.peak = max(Tracked.peak, Tracked.live)
        weakref.finalize(t, Tracked._dead)
        return t

    @staticmethod
    def _dead() -> None:
        Tracked.live -= 1

    def __iter__(self) -> Iterator[str]:
        return iter(self.sd)

    def __len__(self) -> int:
        return len(self.sd)

    def shape(self, k: str) -> tuple[int, ...]:
        return tuple(self.sd[k].shape)

    def dtype(self, k: str) -> torch.dtype:
        return self.sd[k].dtype


def _toy_pool(n_irrelevant: int = 2, seed: int = 0) -> tuple[dict, list[dict]]:
    """fusion_toy's θ_0 and three fine-tunes, plus members far from θ_0 (checkpoints of another origin)."""
    base, models = fusion_toy.checkpoints(seed)
    g = torch.Generator().manual_seed(seed + 50)
    others = [{k: v + 2.0 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_irrelevant)]
    return base, models + others


@pytest.mark.parametrize("lmo", ["layer", "task"])
def test_at_most_one_pool_tensor_alive(lmo: str) -> None:
    base, members = _toy_pool(3)
    Tracked.live = Tracked.peak = 0
    plan = learn_fw_merging(base, [Tracked(m) for m in members], fusion_toy.problem(), steps=4, lmo=lmo,
                            step_rule="line_search", batch_size=8)
    assert Tracked.peak == 1 and Tracked.live == 0
    # the same plan as from the state dicts themselves
    direct = learn_fw_merging(base, members, fusion_toy.problem(), steps=4, lmo=lmo, step_rule="line_search",
                              batch_size=8)
    assert torch.equal(plan.lambdas, direct.lambdas)


def _by_key(plan: FusionPlan) -> dict[str, list[float]]:
    return {k: plan.lambdas[:, i].tolist() for i, k in enumerate(plan.keys)}


def test_members_given_as_paths_are_opened_one_at_a_time(tmp_path: Path, monkeypatch) -> None:
    base, members = _toy_pool(4)
    bpath = write_checkpoint(tmp_path / "base", base)
    paths = [write_checkpoint(tmp_path / f"m{j}", m) for j, m in enumerate(members)]
    state = {"open": 0, "peak": 0, "opened": 0}

    class Counting(Checkpoint):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.member = Path(path) != bpath
            self.closed = False
            if self.member:
                state["open"] += 1
                state["opened"] += 1
                state["peak"] = max(state["peak"], state["open"])

        def close(self) -> None:
            if self.member and not self.closed:
                state["open"] -= 1
                self.closed = True
            super().close()

    monkeypatch.setattr(fwm, "open_checkpoint", Counting)
    plan = learn_fw_merging(bpath, paths, fusion_toy.problem(), steps=3, batch_size=8)
    assert state["peak"] == 1 and state["open"] == 0
    # a header check, then per step one pass over the pool and one over the members chosen
    assert state["opened"] >= len(paths) * 4
    # the same plan as from the state dicts (a file lists its tensors sorted); resident memory does not
    # grow with the pool
    direct = learn_fw_merging(base, members, fusion_toy.problem(), steps=3, batch_size=8)
    assert _by_key(plan) == _by_key(direct)
    small = learn_fw_merging(base, members[:2], fusion_toy.problem(), steps=1, batch_size=8)
    assert small.info["resident_bytes"] == plan.info["resident_bytes"]


def test_tensors_without_gradient_follow_the_mean_coefficients() -> None:
    """``keys`` learns layers.0 only: every other tensor gets each member's mean coefficient over layers.0."""
    base, members = _toy_pool(1)
    plan = learn_fw_merging(base, members, fusion_toy.problem(), steps=5, keys=r"^layers\.0\.", batch_size=8)
    assert plan.info["learned_tensors"] == 2 and plan.info["follower_tensors"] == 4
    cols = {k: i for i, k in enumerate(plan.keys)}
    mean = (plan.lambdas[:, cols["layers.0.weight"]] + plan.lambdas[:, cols["layers.0.bias"]]) / 2
    for k in ("layers.1.weight", "layers.1.bias", "norm.weight", "norm.bias"):
        assert torch.allclose(plan.lambdas[:, cols[k]], mean, atol=1e-6), k
    assert plan.lambdas.sum() > 0


class Shifted(nn.Module):
    """w + shift: ``shift`` is a buffer (in the checkpoints, no gradient) the forward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("shift", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w + self.shift


def test_a_buffer_moves_with_the_members_during_the_steps() -> None:
    """f = ‖w + shift − (1, 0)‖². Member 1 moves w to (1, 0) and shift by (−1, 0): the buffer follows the
    member's coefficient, so at the first step the model is w + shift = (0, 0), not (1, 0); the LMO sees
    it (⟨τ_1, g⟩ = −2 < 0 again at step 1 since f is still 1 there), and the plan gives the buffer the
    member's coefficient."""
    problem = FusionProblem(Shifted(), [FusionTask("q", torch.zeros(1, 1),
                                                  loss=lambda out, b: ((out - torch.tensor([1.0, 0.0])) ** 2).sum())])
    base = {"w": torch.zeros(2), "shift": torch.zeros(2)}
    members = [{"w": torch.tensor([1.0, 0.0]), "shift": torch.tensor([-1.0, 0.0])}]
    plan = learn_fw_merging(base, members, problem, steps=2)
    assert plan.info["learned_tensors"] == 1 and plan.info["follower_tensors"] == 1
    assert plan.info["history"]["loss"]["objective"]["values"] == pytest.approx([1.0, 1.0])
    assert plan.lambdas.tolist() == [[1.0, 1.0]]  # chosen twice: γ = 1 then 2/3 towards the same vertex


# -- through the engine -----------------------------------------------------------------------------


def _write_pool(tmp_path: Path) -> tuple[Path, list[Path]]:
    base, members = _toy_pool(2)
    cfg = {"architectures": ["Toy"]}
    b = write_checkpoint(tmp_path / "base", base, config=cfg)
    return b, [write_checkpoint(tmp_path / f"m{j}", m, config=cfg) for j, m in enumerate(members)]


def _recipe(base: Path, models: list[Path], **params) -> dict:
    return {
        "merge_method": "fw_merging",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": params,
        "dtype": "float32",
        "seed": 3,
    }


def test_engine_writes_what_the_library_computes_and_reruns_from_the_plan(tmp_path: Path, digest) -> None:
    base, members = _write_pool(tmp_path)
    before = [digest(p) for p in (base, *members)]
    params = {"steps": 4, "step_rule": "line_search", "batch_size": 8}
    events: list[Progress] = []
    run_merge(_recipe(base, members, entry_point=ENTRY, **params), tmp_path / "out",
              MergeOptions(allow_code=True, workers=2), progress=events.append)
    steps = [e.current for e in events if e.phase == "planning" and "step" in e.current]
    assert steps[-1].startswith("fw_merging fw step 4/4 loss")
    assert [digest(p) for p in (base, *members)] == before
    out = load_file(tmp_path / "out" / "model.safetensors")
    plan = FusionPlan.load(tmp_path / "out" / "fusion_plan")
    assert plan.method == "fw_merging" and plan.n_tasks == 5 and plan.info["target_tasks"] == [
        "task0", "task1", "task2"]
    # the library call on the same paths (seed = the recipe's) gives the same bytes
    lib, lib_plan = fw_merge(base, members, fusion_toy.problem(), seed=3, **params)
    assert torch.equal(lib_plan.lambdas, plan.lambdas)
    assert set(lib) == set(out) and all(torch.equal(lib[k], out[k]) for k in out)
    # a re-run from the saved plan needs no code and no data, and writes the same bytes
    run_merge(_recipe(base, members, plan=str(tmp_path / "out" / "fusion_plan")), tmp_path / "again",
              MergeOptions(workers=1))
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors").read_bytes()
    # ... but not for another pool
    with pytest.raises(ShapeMismatchError, match="learned for 5 task model"):
        run_merge(_recipe(base, members[:4], plan=str(tmp_path / "out" / "fusion_plan")), tmp_path / "o2")


def test_engine_refuses_code_and_bad_recipes(tmp_path: Path) -> None:
    base, members = _write_pool(tmp_path)
    with pytest.raises(CodeRefusedError, match="allow-code"):
        run_merge(_recipe(base, members, entry_point=ENTRY), tmp_path / "o")
    opts = MergeOptions(allow_code=True)
    cases = [
        ({"steps": 0}, "'steps' must be an integer >= 1"),
        ({"step_rule": "armijo"}, "step_rule"),
        ({"lmo": "block"}, "lmo"),
        ({"scale": -1.0}, "scale"),
        ({"entry_point": ""}, "exactly one of the parameters 'entry_point'"),
    ]
    for params, needle in cases:
        with pytest.raises(RecipeError, match=needle):
            run_merge(_recipe(base, members, **{"entry_point": ENTRY, **params}), tmp_path / "o", opts)
    no_base = _recipe(base, members, entry_point=ENTRY)
    del no_base["base_model"]
    with pytest.raises(RecipeError, match="base"):
        run_merge(no_base, tmp_path / "o", opts)
    sd = load_file(members[1] / "model.safetensors")
    sd["layers.0.weight"] = torch.zeros(12, 5)
    bad = write_checkpoint(tmp_path / "bad", sd)
    with pytest.raises(ShapeMismatchError, match="layers.0.weight"):
        run_merge(_recipe(base, [members[0], bad], entry_point=ENTRY), tmp_path / "o", opts)
    assert not (tmp_path / "o").exists()


def test_cancel_during_the_pool_pass_writes_nothing(tmp_path: Path) -> None:
    base, members = _write_pool(tmp_path)
    cancel = threading.Event()
    seen: list[str] = []

    def progress(p: Progress) -> None:
        seen.append(p.current)
        if "lmo step 2/5" in p.current:  # the second member of the first step's oracle pass
            cancel.set()

    with pytest.raises(MergeCancelled):
        run_merge(_recipe(base, members, entry_point=ENTRY, steps=100), tmp_path / "o",
                  MergeOptions(allow_code=True), progress=progress, cancel=cancel)
    assert not any("fw step" in c for c in seen)  # it did not wait for the step to end
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial-*"))


# -- bad input, library -------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors() -> None:
    base, members = _toy_pool(1)
    p = fusion_toy.problem()
    with pytest.raises(RecipeError, match="pool is empty"):
        learn_fw_merging(base, [], p)
    for steps in (0, -3):
        with pytest.raises(RecipeError, match="'steps' must be an integer >= 1"):
            learn_fw_merging(base, members, p, steps=steps)
    with pytest.raises(RecipeError, match="'oracle' must be one of inner, cosine"):
        learn_fw_merging(base, members, p, oracle="dot")
    with pytest.raises(RecipeError, match="'scale' must be a positive"):
        learn_fw_merging(base, members, p, scale=float("nan"))
    with pytest.raises(RecipeError, match="no target task"):
        learn_fw_merging(base, members, FusionProblem(p.model, []))
    with pytest.raises(RecipeError, match="no checkpoint tensor is a parameter"):
        learn_fw_merging(base, members, p, keys="^nothing")
    missing = dict(members[2])
    del missing["norm.bias"]
    with pytest.raises(MissingTensorError, match=r"pool member 3 \(member3\) has no tensor 'norm.bias'"):
        learn_fw_merging(base, [members[0], members[1], missing], p)
    wrong = dict(members[1])
    wrong["layers.1.bias"] = torch.zeros(13)
    with pytest.raises(ShapeMismatchError, match=r"'layers.1.bias' has shape \[13\] in pool member 2"):
        learn_fw_merging(base, [members[0], wrong], p)
    nan = {k: v.clone() for k, v in members[0].items()}
    nan["layers.1.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="member1.*layers.1.weight"):
        learn_fw_merging(base, [nan], p, steps=1)


def test_registered_schema() -> None:
    spec = get_method("fw_merging")
    assert spec.kind == "whole_model" and spec.base == "required" and spec.url.endswith("2503.12649")
    assert spec.params["entry_point"].code and spec.params["plan"].path
    assert {"steps", "step_rule", "lmo", "oracle", "scale", "include_base", "seed"} <= set(spec.params)
