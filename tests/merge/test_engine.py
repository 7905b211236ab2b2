"""The streaming engine: plans from names and shapes, gradients/filters, slices, errors, atomicity."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge.checkpoint import open_checkpoint
from merge.errors import (
    MergeCancelled,
    MissingTensorError,
    ModelNotFoundError,
    NonFiniteError,
    RecipeError,
    ShapeMismatchError,
)
from merge.execute import Progress, run_merge
from merge.plan import MergeOptions, layer_stack, plan_merge
from tests.conftest import llama_like, write_checkpoint


def linear_recipe(paths: list[Path], **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p)} for p in paths], **extra}


def test_linear_matches_hand_computation_and_keeps_layout(make_models, tmp_path: Path) -> None:
    paths = make_models(3, shards=2, dtype=torch.bfloat16)
    rec = {"merge_method": "linear", "dtype": "bfloat16",
           "models": [{"model": str(paths[0]), "parameters": {"weight": 1.0}},
                      {"model": str(paths[1]), "parameters": {"weight": 2.0}},
                      {"model": str(paths[2]), "parameters": {"weight": 3.0}}]}
    res = run_merge(rec, tmp_path / "out", MergeOptions(chunk_elems=100))  # many chunks per tensor
    out = open_checkpoint(tmp_path / "out")
    ins = [open_checkpoint(p) for p in paths]
    assert set(out) == set(ins[0]) and res.n_tensors == len(ins[0])
    for name in out:
        exp = sum(w * c[name].float() for w, c in zip([1.0, 2.0, 3.0], ins, strict=True)) / 6.0
        assert out.dtype(name) == torch.bfloat16
        torch.testing.assert_close(out[name].float(), exp.to(torch.bfloat16).float(), rtol=0, atol=0)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "README.md", "weightsmith_recipe.yml"} <= files


def test_one_model_linear_is_identity_and_float32_by_default(make_models, tmp_path: Path) -> None:
    (base,) = make_models(1)
    run_merge(linear_recipe([base]), tmp_path / "out")
    a, b = open_checkpoint(base), open_checkpoint(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradients_and_filters_resolve_per_layer(make_models) -> None:
    paths = make_models(2)
    rec = linear_recipe(paths)
    rec["models"][1]["parameters"] = {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 5.0}]}
    plan = plan_merge(rec)
    w = {t.name: t.params["weight"][1] for t in plan.tasks}
    assert w["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert w["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert w["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert w["model.layers.1.self_attn.q_proj.weight"] == 5.0
    assert w["model.embed_tokens.weight"] == 5.0  # outside the layer stack: t = 0, no mlp filter match
    assert all(t.params["weight"][0] == 1.0 for t in plan.tasks)


def test_layer_stack_detection() -> None:
    assert layer_stack(["model.layers.0.a", "model.layers.11.b", "model.embed"]) == ("model.layers", 12)
    assert layer_stack(["encoder.layer.5.x", "encoder.layer.0.y", "pooler.w"]) == ("encoder.layer", 6)
    assert layer_stack(["a", "b"]) == (None, 0)


def test_slices_stack_layers_and_update_config(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", llama_like(1, layers=4), config={"num_hidden_layers": 4})
    b = write_checkpoint(tmp_path / "b", llama_like(2, layers=4), config={"num_hidden_layers": 4})
    rec = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
    ]}
    run_merge(rec, tmp_path / "out")
    out, ca, cb = open_checkpoint(tmp_path / "out"), open_checkpoint(a), open_checkpoint(b)
    assert layer_stack(list(out))[1] == 6
    for i in range(3):
        assert torch.equal(out[f"model.layers.{i}.mlp.up_proj.weight"], ca[f"model.layers.{i}.mlp.up_proj.weight"])
        assert torch.equal(out[f"model.layers.{i + 3}.mlp.up_proj.weight"],
                           cb[f"model.layers.{i + 1}.mlp.up_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], ca["model.embed_tokens.weight"])  # first slice: pre
    assert torch.equal(out["lm_head.weight"], cb["lm_head.weight"])  # last slice: post
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_slice_beyond_model_layers_is_an_error(make_models, tmp_path: Path) -> None:
    (a,) = make_models(1)
    rec = {"merge_method": "linear", "slices": [{"sources": [{"model": str(a), "layer_range": [0, 5]}]}]}
    with pytest.raises(RecipeError, match="layer 3 requested by layer_range \\[0, 5\\] does not exist"):
        run_merge(rec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_float_tensors_are_copied(tmp_path: Path) -> None:
    sd1 = {"w": torch.ones(3), "pos": torch.arange(5)}
    sd2 = {"w": torch.zeros(3), "pos": torch.arange(5)}
    write_checkpoint(tmp_path / "a", sd1)
    write_checkpoint(tmp_path / "b", sd2)
    run_merge(linear_recipe([tmp_path / "a", tmp_path / "b"]), tmp_path / "out")
    out = open_checkpoint(tmp_path / "out")
    assert torch.equal(out["pos"], torch.arange(5)) and torch.equal(out["w"], torch.full((3,), 0.5))


def test_merging_twice_is_byte_identical(make_models, tmp_path: Path) -> None:
    paths = make_models(3, shards=2)
    rec = linear_recipe(paths, dtype="bfloat16")
    run_merge(rec, tmp_path / "o1", MergeOptions(workers=1, shard_size=3000))
    run_merge(rec, tmp_path / "o2", MergeOptions(workers=4, shard_size=3000))
    f1 = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert f1 == sorted(p.name for p in (tmp_path / "o2").iterdir()) and len(f1) > 4
    for name in f1:
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name


@pytest.mark.parametrize("case", ["shape", "missing", "extra", "nan", "model", "method", "param", "malformed"])
def test_bad_inputs_name_the_problem_and_write_nothing(make_models, tmp_path: Path, digest, case: str) -> None:
    paths = make_models(2)
    rec = linear_recipe(paths)
    ft = paths[1] / "model.safetensors"
    sd = open_checkpoint(ft)
    sd = {k: sd[k] for k in sd}
    exc: type[Exception]
    if case == "shape":
        sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
        exc, match = ShapeMismatchError, r"tensor 'model.layers.1.mlp.up_proj.weight': .*ft1.* has shape \[5, 5\]"
    elif case == "missing":
        del sd["lm_head.weight"]
        exc, match = MissingTensorError, r"ft1.*tensor 'lm_head.weight' is missing"
    elif case == "extra":
        sd["extra.weight"] = torch.zeros(2)
        exc, match = MissingTensorError, "extra.weight"
    elif case == "nan":
        sd["model.norm.weight"][3] = float("nan")
        exc, match = NonFiniteError, r"ft1.*tensor 'model.norm.weight' contains NaN or Inf"
    elif case == "model":
        rec["models"].append({"model": str(tmp_path / "does-not-exist")})
        exc, match = ModelNotFoundError, "does-not-exist"
    elif case == "method":
        rec["merge_method"] = "frobnicate"
        exc, match = RecipeError, "unknown merge method 'frobnicate'"
    elif case == "param":
        rec["models"][0]["parameters"] = {"weight": "heavy"}
        exc, match = RecipeError, "parameter 'weight' of method 'linear' must be float: got 'heavy'"
    else:
        ft.write_bytes(ft.read_bytes()[:-10])
        exc, match = Exception, "truncated"
    if case not in ("model", "method", "param", "malformed"):
        save_file(sd, ft)
    before = [digest(p) for p in paths]
    with pytest.raises(exc, match=match):
        run_merge(rec, tmp_path / "out")
    assert [digest(p) for p in paths] == before
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_cancel_leaves_nothing(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    cancel = threading.Event()
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.tensors_done >= 3:
            cancel.set()

    with pytest.raises(MergeCancelled):
        run_merge(linear_recipe(paths), tmp_path / "out", progress=progress, cancel=cancel)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
    assert seen and seen[-1].tensors_total == len(open_checkpoint(paths[0]))


def test_progress_reaches_totals(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    seen: list[Progress] = []
    run_merge(linear_recipe(paths), tmp_path / "out", progress=seen.append)
    assert seen[-1].phase == "done" and seen[-1].bytes_done == seen[-1].bytes_total > 0
    done = [p.bytes_done for p in seen]
    assert done == sorted(done)


def test_dry_run_plan_reads_no_data(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    for p in paths:  # corrupt the data section but keep headers: planning must not notice
        f = p / "model.safetensors"
        raw = bytearray(f.read_bytes())
        raw[-4:] = b"\xff\xff\xff\x7f"
        f.write_bytes(bytes(raw))
    plan = plan_merge(linear_recipe(paths))
    assert plan.n_tensors == len(open_checkpoint(paths[0])) and plan.bytes_out > 0


@pytest.mark.parametrize(
    ("method", "who", "value", "weights"),
    [
        ("task_arithmetic", "base", float("nan"), [1.0]),  # NaN in the base
        ("task_arithmetic", "ft1", float("inf"), [0.0]),  # Inf in a model weighted 0: 0·Inf is NaN, still found
        ("linear", "ft1", float("-inf"), [0.0]),
        ("ties", "ft1", float("nan"), [1.0]),  # inputs checked one by one (trimming could hide it)
        ("dare_linear", "ft1", float("inf"), [1.0]),
    ],
)
def test_nonfinite_inputs_are_named_whatever_the_method(
    make_models, tmp_path: Path, method: str, who: str, value: float, weights: list[float]
) -> None:
    base, ft0, ft1 = make_models(3)
    target = {"base": base, "ft1": ft1}[who]
    sd = open_checkpoint(target)
    sd = {k: sd[k] for k in sd}
    sd["model.layers.1.mlp.up_proj.weight"][2, 3] = value
    save_file(sd, target / "model.safetensors")
    rec = {
        "merge_method": method,
        "models": [{"model": str(ft0)}, {"model": str(ft1), "parameters": {"weight": weights[0]}}],
        "parameters": {"density": 0.5} if method in ("ties", "dare_linear") else {},
    }
    if method != "linear":
        rec["base_model"] = str(base)
    match = rf"{target.name}.*tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or Inf"
    with pytest.raises(NonFiniteError, match=match):
        run_merge(rec, tmp_path / "out", MergeOptions(chunk_elems=64))
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_an_overflow_of_finite_inputs_is_not_blamed_on_an_input(make_models, tmp_path: Path) -> None:
    a, b = make_models(2)
    for p in (a, b):
        sd = open_checkpoint(p)
        sd = {k: sd[k] for k in sd}
        sd["model.norm.weight"][:] = 3e38
        save_file(sd, p / "model.safetensors")
    rec = linear_recipe([a, b], parameters={"normalize": False})
    run_merge(rec, tmp_path / "out")  # written as computed (mergekit does the same)
    assert torch.isinf(open_checkpoint(tmp_path / "out")["model.norm.weight"]).all()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_a_plan_survives_pickling(tmp_path: Path, method: str) -> None:
    """The service plans a merge once, at admission, and hands the plan to its worker process pickled
    (methods by registered name, checkpoints by their headers): the same bytes as planning again."""
    import pickle

    from merge.plan import plan_merge
    from testkit.checkpoints import llama_like, write_checkpoint

    paths = [tmp_path / f"m{i}" for i in range(3)]
    for i, p in enumerate(paths):
        write_checkpoint(p, llama_like(i))
    per_model = {"weight": 0.5} if method == "linear" else {"weight": 0.5, "density": 0.6}
    rec = {
        "merge_method": method,
        "models": [{"model": str(p), "parameters": per_model} for p in paths[1:]],
        **({} if method == "linear" else {"base_model": str(paths[0])}),
    }
    plan = plan_merge(rec)
    for c in plan.checkpoints:
        c.close()
    handed = pickle.loads(pickle.dumps(plan))
    assert handed.method is plan.method  # the registered spec itself, found by name
    run_merge(rec, tmp_path / "fresh")
    run_merge(rec, tmp_path / "handed", plan=handed)
    fresh, handed_out = (tmp_path / d / "model.safetensors" for d in ("fresh", "handed"))
    assert fresh.read_bytes() == handed_out.read_bytes()
