"""EMR-Merging (Huang et al., NeurIPS 2024): elect, mask and rescale by hand, invariants, the plan, the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from merge.errors import CheckpointError, MissingTensorError, RecipeError, ShapeMismatchError
from merge.execute import merge_in_memory, run_merge
from merge.methods import get_method
from merge.methods.emr import EMRPlan, PlanMismatchError, elect, emr_plan, pack_mask, unpack_mask
from merge.plan import MergeOptions
from service.cli.main import main
from tests.conftest import llama_like, write_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (a busy 2-core machine: OpenMP spinning makes small tests slow)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The 1-D example, by hand (base 0, so θ_i = τ_i):
#   τ_1 = [ 1,   -2,  3,  0.5]
#   τ_2 = [ 2,    1, -1, -0.5]
#   τ_3 = [-0.5, -1,  2, -1  ]
#   Σ τ = [2.5, -2, 4, -1]  ->  γ = [+, -, +, -]
#   agreeing: e0 {τ_1 = 1, τ_2 = 2}, e1 {-2, -1}, e2 {3, 2}, e3 {-0.5, -1}  ->  ε = [2, 2, 3, 1]
#   τ_uni = [2, -2, 3, -1];  M_1 = [1, 1, 1, 0], M_2 = [1, 0, 0, 1], M_3 = [0, 1, 1, 1]
#   λ_1 = (1 + 2 + 3 + 0.5) / (2 + 2 + 3) = 6.5 / 7,  λ_2 = 4.5 / 3 = 1.5,  λ_3 = 4.5 / 6 = 0.75
A = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([2.0, 1.0, -1.0, -0.5]), torch.tensor([-0.5, -1.0, 2.0, -1.0])]
# a second tensor, for the rescale variants:
#   τ_1 = [4, 0], τ_2 = [-2, 2], τ_3 = [1, 1];  Σ = [3, 3] -> γ = [+, +];  ε = [4, 2] -> τ_uni = [4, 2]
#   M_1 = [1, 0], M_2 = [0, 1], M_3 = [1, 1]
#   per tensor (Σ|τ_i|, Σ|M_i τ_uni|): a: (6.5, 7), (4.5, 3), (4.5, 6);  b: (4, 4), (4, 2), (2, 6)
B = [torch.tensor([4.0, 0.0]), torch.tensor([-2.0, 2.0]), torch.tensor([1.0, 1.0])]


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _two_tensor_models(base_value: float = 0.0) -> tuple[dict, list[dict]]:
    base = {"a": torch.full((4,), base_value), "b": torch.full((2,), base_value),
            "step": torch.tensor(7, dtype=torch.int64)}
    models = [{"a": base["a"] + a, "b": base["b"] + b, "step": torch.tensor(i, dtype=torch.int64)}
              for i, (a, b) in enumerate(zip(A, B, strict=True))]
    return base, models


def test_elect_mask_rescale_by_hand_1d() -> None:
    tau_uni, masks = elect(A)
    assert torch.equal(tau_uni, torch.tensor([2.0, -2.0, 3.0, -1.0]))
    assert [m.tolist() for m in masks] == [[True, True, True, False], [True, False, False, True],
                                           [False, True, True, True]]
    base = {"w": torch.full((4,), 10.0)}
    plan = emr_plan(base, [{"w": base["w"] + a} for a in A])
    assert plan.keys == ["w"] and plan.n_tasks == 3
    assert plan.task_lambda == [_f32(6.5 / 7), 1.5, 0.75]
    assert torch.equal(plan.tau["w"], tau_uni)
    assert [plan.mask(i, "w").tolist() for i in range(3)] == [m.tolist() for m in masks]
    # θ̂_i = θ_0 + λ_i M_i ⊙ τ_uni
    assert torch.allclose(plan.task_model(0, base)["w"], 10 + torch.tensor([2.0, -2.0, 3.0, 0.0]) * 6.5 / 7)
    assert torch.equal(plan.task_model(1, base)["w"], torch.tensor([13.0, 10.0, 10.0, 8.5]))
    assert torch.equal(plan.task_model(2, base)["w"], torch.tensor([10.0, 8.5, 12.25, 9.25]))
    assert torch.equal(plan.task_vector(1, "w"), torch.tensor([3.0, 0.0, 0.0, -1.5]))
    # the read-outs: θ_0 + τ_uni, and the mean of the three task models
    assert torch.equal(plan.model("unified", base)["w"], 10 + tau_uni)
    mean = torch.stack([plan.task_model(i, base)["w"] for i in range(3)]).mean(0)
    assert torch.allclose(plan.model("mean", base)["w"], mean, atol=1e-6)
    assert plan.kept_fraction() == [0.75, 0.5, 0.75]


def test_rescale_variants_by_hand() -> None:
    base, models = _two_tensor_models()
    by = {r: emr_plan(base, models, rescale=r) for r in ("model", "reference", "tensor", "none")}
    assert by["model"].keys == ["a", "b"]  # the int64 'step' is not merged
    # Eq. 6 over the whole model: (6.5 + 4) / (7 + 4), (4.5 + 4) / (3 + 2), (4.5 + 2) / (6 + 6)
    assert by["model"].task_lambda == pytest.approx([10.5 / 11, 1.7, 6.5 / 12], rel=1e-7)
    # the authors' code: sums of per-tensor means (a has 4 entries, b 2)
    ref = [(6.5 / 4 + 4 / 2) / (7 / 4 + 4 / 2), (4.5 / 4 + 4 / 2) / (3 / 4 + 2 / 2),
           (4.5 / 4 + 2 / 2) / (6 / 4 + 6 / 2)]
    assert by["reference"].task_lambda == pytest.approx(ref, rel=1e-7)
    assert torch.allclose(by["tensor"].lambdas, torch.tensor([[6.5 / 7, 1.0], [1.5, 2.0], [0.75, 1 / 3]]))
    assert torch.equal(by["none"].lambdas, torch.ones(3, 2))
    assert torch.equal(by["model"].tau["b"], torch.tensor([4.0, 2.0]))
    # the task model uses its λ on every tensor (model) or each tensor's own (tensor)
    t1 = by["tensor"].task_model(1, base)
    assert torch.equal(t1["a"], torch.tensor([3.0, 0.0, 0.0, -1.5])) and torch.equal(t1["b"], torch.tensor([0.0, 4.0]))
    assert torch.equal(t1["step"], base["step"])
    m2 = by["model"].task_model(2, base)
    assert torch.allclose(m2["b"], torch.tensor([4.0, 2.0]) * 6.5 / 12)
    assert torch.equal(by["none"].task_model(0, base)["b"], torch.tensor([4.0, 0.0]))


def test_ties_elect_the_negative_side_and_zero_task_vectors() -> None:
    # Σ τ = 0 exactly: the authors' code takes γ = −1 there; an all-zero entry stays θ_0 everywhere
    taus = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 0.0, 2.0])]
    tau_uni, masks = elect(taus)
    assert torch.equal(tau_uni, torch.tensor([-1.0, 0.0, 2.0]))
    assert [m.tolist() for m in masks] == [[False, False, False], [True, False, True]]
    # a model whose mask is empty gets λ = 1 (its model is θ_0 anyway), not 0/0
    base = {"w": torch.zeros(2)}
    plan = emr_plan(base, [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([-0.5, -0.5])}])
    assert plan.task_lambda[1] == 1.0 and plan.kept_fraction() == [1.0, 0.0]
    assert torch.equal(plan.task_model(1, base)["w"], torch.zeros(2))


def test_one_model_gives_the_finetune_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(37, 5, generator=g), "b": torch.randn(5, generator=g)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft["b"][:2] = base["b"][:2]  # entries the fine-tune left alone
    for rescale in ("model", "reference", "tensor", "none"):
        plan = emr_plan(base, [ft], rescale=rescale)
        assert torch.equal(plan.lambdas, torch.ones(1, 2)), rescale
        out = plan.task_model(0, base)
        assert all(torch.equal(out[k], ft[k]) for k in ft), rescale
        assert torch.equal(plan.mask(0, "b"), ft["b"] != base["b"])
        assert all(torch.equal(plan.model("mean", base)[k], ft[k]) for k in ft)


def test_task_models_follow_tau_uni_signs_and_magnitudes() -> None:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 32, generator=g), "v": torch.randn(100, generator=g)}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(5)]
    plan = emr_plan(base, models)
    for k in base:
        tau_uni = plan.tau[k]
        taus = [m[k] - base[k] for m in models]
        # γ is the sign of the sum; |τ_uni| is the largest agreeing magnitude
        assert torch.equal(torch.sign(tau_uni), torch.where(sum(taus) > 0, 1.0, -1.0))
        agree = torch.stack([torch.where(t * tau_uni > 0, t.abs(), 0.0) for t in taus])
        assert torch.equal(tau_uni.abs(), agree.max(0).values)
        for i, t in enumerate(taus):
            m = plan.mask(i, k)
            assert torch.equal(m, t * tau_uni > 0)
            delta = plan.task_model(i, base)[k] - base[k]
            nz = delta != 0
            assert torch.equal(torch.sign(delta[nz]), torch.sign(tau_uni[nz]))  # never against τ_uni
            assert not nz[~m].any()  # nothing outside the mask
            assert torch.allclose(delta, plan.task_lambda[i] * m * tau_uni, atol=1e-6)
    # λ_i = Σ|τ_i| / Σ|M_i τ_uni| over both tensors
    for i, m in enumerate(models):
        num = sum(float((m[k] - base[k]).abs().double().sum()) for k in base)
        den = sum(float((plan.mask(i, k) * plan.tau[k]).abs().double().sum()) for k in base)
        assert plan.task_lambda[i] == pytest.approx(num / den, rel=1e-6)
        assert 0 < plan.task_lambda[i] < 1  # the elected magnitudes are maxima: λ scales them back


def test_mask_bits_round_trip_through_the_saved_plan(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    shapes = {"odd": (13,), "scalar": (), "cube": (3, 5, 7), "big": (64, 64)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    plan = emr_plan(base, models, rescale="tensor")
    # the documented encoding: numpy.packbits, little bit order, one row per task
    for k, s in shapes.items():
        bits = torch.stack([plan.mask(i, k) for i in range(3)])
        assert plan.masks[k].dtype == torch.uint8
        assert tuple(plan.masks[k].shape) == (3, -(-bits[0].numel() // 8))
        raw = np.packbits(bits.reshape(3, -1).numpy(), axis=1, bitorder="little")
        assert np.array_equal(plan.masks[k].numpy(), raw)
        assert torch.equal(unpack_mask(pack_mask(list(bits)), s), bits)
    plan.save(tmp_path / "plan")
    card = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert card["format"] == "weightsmith-emr-plan" and card["rescale"] == "tensor" and card["n_tasks"] == 3
    back = EMRPlan.load(tmp_path / "plan")
    assert back.keys == plan.keys and back.shapes == plan.shapes and torch.equal(back.lambdas, plan.lambdas)
    for k in shapes:
        assert torch.equal(back.masks[k], plan.masks[k]) and torch.equal(back.tau[k], plan.tau[k])
    # every task model, rebuilt from the base and the plan alone, is the same bytes
    for i in range(3):
        a, b = plan.task_model(i, base), back.task_model(i, base)
        assert all(torch.equal(a[k], b[k]) for k in a)
    st = plan.storage()
    assert st["parameters"] == 13 + 1 + 105 + 4096
    assert st["mask_bytes"] == 3 * (2 + 1 + 14 + 512)
    # one bit per parameter per task, up to the padding of the last byte of each tensor
    assert 1.0 <= st["mask_bits_per_parameter_per_task"] < 1.01
    # corruption and other base models are refused
    data = tmp_path / "plan" / "plan.safetensors"
    raw_bytes = bytearray(data.read_bytes())
    raw_bytes[-1] ^= 1
    data.write_bytes(bytes(raw_bytes))
    with pytest.raises(CheckpointError, match="SHA-256"):
        EMRPlan.load(tmp_path / "plan")
    with pytest.raises(CheckpointError, match="not an emr plan"):
        EMRPlan.load(tmp_path)
    other = {k: v + 1 for k, v in base.items()}
    with pytest.raises(PlanMismatchError, match="not the same base model"):
        plan.task_model(0, other)
    assert plan.select(0).select("mean").task == "mean"
    with pytest.raises(PlanMismatchError, match="shape"):
        plan.task_model(0, {**base, "odd": torch.zeros(12)})


def test_errors_are_clear() -> None:
    base, models = _two_tensor_models()
    with pytest.raises(RecipeError, match="requires a base_model"):
        emr_plan(None, models)
    with pytest.raises(RecipeError, match="at least one model"):
        emr_plan(base, [])
    for bad in (3, "3", -1, "-1"):
        with pytest.raises(RecipeError, match=r"task -?3? ?.*out of range: there are 3 task model\(s\), indexed 0..2"):
            emr_plan(base, models, task=bad)
    with pytest.raises(RecipeError, match="'nope' is not one of the models"):
        emr_plan(base, models, task="nope")
    with pytest.raises(RecipeError, match="'rescale' must be one of model, reference, tensor, none"):
        emr_plan(base, models, rescale="layer")
    with pytest.raises(MissingTensorError, match="model 1 has no tensor 'b'"):
        emr_plan(base, [models[0], {"a": models[1]["a"]}])
    with pytest.raises(ShapeMismatchError, match="'a' has shape \\[5\\] in model 2"):
        emr_plan(base, [*models[:2], {**models[2], "a": torch.zeros(5)}])
    plan = emr_plan(base, models, task=2, keep=False)
    assert not plan.has_vectors and plan.artifacts() == {}
    with pytest.raises(RecipeError, match="save_plan: false"):
        plan.task_model(0, base)
    # without τ_uni and masks the engine path elects again from the inputs: the same values
    kept = emr_plan(base, models, task=2)
    for k in ("a", "b"):
        again = plan.apply(k, [m[k] for m in models], base[k])
        assert torch.equal(again, kept.apply(k, [], base[k]))
        assert torch.equal(again, kept.task_model(2, base)[k])
    with pytest.raises(MissingTensorError, match="'zzz' is not in the plan"):
        kept.apply("zzz", [], torch.zeros(1))
    with pytest.raises(RecipeError, match="needs the base"):
        kept.apply("a", [], None)


def test_registered_as_a_whole_model_method() -> None:
    spec = get_method("emr")
    d = spec.describe()
    assert d["kind"] == "whole_model" and d["base"] == "required" and not d["randomized"]
    params = {p["name"]: p for p in d["params"]}
    assert set(params) == {"task", "rescale", "save_plan"}
    assert params["task"]["default"] == "mean" and params["rescale"]["default"] == "model"
    assert spec.validate_value("task", 2) == 2 and spec.validate_value("task", "ft_a") == "ft_a"
    assert "arxiv.org/abs/2405.17461" in d["url"]


# -- the engine --------------------------------------------------------------------------------------


def _write(tmp_path: Path, n: int = 3) -> tuple[Path, list[Path], dict, list[dict]]:
    base = llama_like(0, layers=2)
    models = [llama_like(i, base=base, layers=2) for i in range(1, n + 1)]
    bp = write_checkpoint(tmp_path / "base", base)
    mps = [write_checkpoint(tmp_path / f"ft_{c}", m) for c, m in zip("abcdef", models, strict=False)]
    return bp, mps, base, models


def _recipe(base: Path, models: list[Path], **params) -> dict:
    return {"merge_method": "emr", "base_model": str(base), "models": [{"model": str(m)} for m in models],
            "parameters": params, "dtype": "float32"}


def test_engine_output_is_the_library_call_bit_for_bit(tmp_path: Path) -> None:
    bp, mps, base, models = _write(tmp_path)
    plan = emr_plan(base, models)
    out = tmp_path / "out"
    run_merge(_recipe(bp, mps, task=1), out, MergeOptions(workers=2))
    got = load_file(out / "model.safetensors")
    want = plan.task_model(1, base)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    # the plan folder: every task model from the base alone, without the fine-tuned models
    saved = EMRPlan.load(out / "emr_plan")
    assert saved.task_names == [str(m) for m in mps] and saved.task == 1
    assert saved.task_lambda == plan.task_lambda
    base_only = load_file(bp / "model.safetensors")
    for i in range(3):
        rebuilt, lib = saved.task_model(i, base_only), plan.task_model(i, base)
        assert all(torch.equal(rebuilt[k], lib[k]) for k in lib)
    assert torch.equal(saved.task_model(1, base_only)["lm_head.weight"], got["lm_head.weight"])
    # the task by reference (path, folder name), the read-outs, and without a saved plan: same bytes
    for task, which in ((str(mps[2]), 2), ("ft_a", 0), ("0", 0), ("mean", "mean"), ("unified", "unified")):
        for save_plan in (True, False):
            sd = merge_in_memory(_recipe(bp, mps, task=task, save_plan=save_plan), MergeOptions(workers=1))
            ref = plan.model(which, base)
            assert all(torch.equal(sd[k], ref[k]) for k in ref), (task, save_plan)
    run_merge(_recipe(bp, mps, task="ft_c", save_plan=False), tmp_path / "nosave", MergeOptions(workers=1))
    assert not (tmp_path / "nosave" / "emr_plan").exists()
    assert load_file(tmp_path / "nosave" / "model.safetensors").keys() == got.keys()


def test_cli_merges_with_a_yaml_recipe_and_refuses_bad_tasks(tmp_path: Path) -> None:
    bp, mps, base, models = _write(tmp_path, n=2)
    path = tmp_path / "r.yaml"

    def run(r: dict, out: str):
        path.write_text(yaml.safe_dump(r))
        return CliRunner().invoke(main, ["merge", str(path), "-o", str(tmp_path / out)])

    res = run(_recipe(bp, mps, task=1), "out")
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = emr_plan(base, models).task_model(1, base)
    assert all(torch.equal(got[k], want[k]) for k in want)
    cases = [
        (_recipe(bp, mps, task=2), "task 2 is out of range"),
        (_recipe(bp, mps, task="ft_z"), "'ft_z' is not one of the models"),
        (_recipe(bp, mps, rescale="layer"), "'rescale' must be one of"),
        ({k: v for k, v in _recipe(bp, mps).items() if k != "base_model"}, "requires a base_model"),
    ]
    for i, (rec, needle) in enumerate(cases):
        res = run(rec, f"bad{i}")
        assert res.exit_code == 2 and needle in res.output, (needle, res.output)
        assert not (tmp_path / f"bad{i}").exists()
