"""The directed model graph (issue 24): direction, merges, descendants; detect_lineage in real pools."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from merge.errors import InvalidArgumentError
from merge.methods import get_method
from merge.methods.runner import merge_tensors
from metanets.lineage import detect_lineage
from metanets.lineage.graph import _nnls_gram, recover_model_graph
from service.cli.main import main
from tests.metanets.test_lineage import fine_tune, mlp_state


def merged(method: str, states: list[dict], base: dict | None, **params) -> dict[str, torch.Tensor]:
    spec = get_method(method)
    return {
        k: merge_tensors(spec, [s[k] for s in states], None if base is None else base[k], params, name=k, seed=1)
        for k in states[0]
    }


@pytest.fixture(scope="module")
def pool() -> dict[str, dict[str, torch.Tensor]]:
    """base -> ft1, ft2, ft3 (independent fine-tunes); ft1 -> ft1a (a further fine-tune); merges; a stranger."""
    base = mlp_state(0, widths=(64, 96, 96, 10))
    p = {"base": base}
    for i in (1, 2, 3):
        p[f"ft{i}"] = fine_tune(base, 10 + i, 0.3, rank=4, noise=0.1)
    p["ft1a"] = fine_tune(p["ft1"], 40, 0.3, rank=4, noise=0.1)
    p["ties12"] = merged("ties", [p["ft1"], p["ft2"]], base, weight=[0.5, 0.5], density=0.5)
    p["lin23"] = merged("linear", [p["ft2"], p["ft3"]], None, weight=[0.7, 0.3])
    p["dare123"] = merged("dare_linear", [p["ft1"], p["ft2"], p["ft3"]], base, weight=[0.5, 0.3, 0.2], density=0.8)
    p["stranger"] = mlp_state(7, widths=(64, 96, 96, 10))
    return p


def test_nnls_on_gram_recovers_a_nonnegative_combination() -> None:
    g = np.random.default_rng(0)
    P = g.normal(size=(200, 3))
    x = P @ np.array([0.5, 0.0, 0.25])
    w, res = _nnls_gram(P.T @ P, P.T @ x, float(x @ x))
    assert w == pytest.approx([0.5, 0.0, 0.25], abs=1e-8) and res < 1e-6
    # a direction only reachable with a negative weight is left as residual
    w, res = _nnls_gram(P.T @ P, P.T @ -P[:, 0], float(P[:, 0] @ P[:, 0]))
    assert w[0] == 0 and res > 0.5


def test_the_whole_pool_graph_has_direction_merges_and_families(pool) -> None:
    g = recover_model_graph(pool)
    assert sorted(map(sorted, g.clusters)) == sorted(
        [sorted(k for k in pool if k != "stranger"), ["stranger"]]
    )
    for ft in ("ft1", "ft2", "ft3"):
        assert g.parent(ft) == "base", g.summary()
    assert g.parent("ft1a") == "ft1", g.summary()
    assert "base" in g.roots and "stranger" in g.roots
    assert set(g.merges) == {"ties12", "lin23", "dare123"}, g.summary()
    assert set(g.merges["lin23"].components) == {"ft2", "ft3"}
    assert g.merges["lin23"].components["ft2"] == pytest.approx(0.7, abs=0.02)
    assert set(g.merges["dare123"].components) == {"ft1", "ft2", "ft3"}
    for k, w in {"ft1": 0.5, "ft2": 0.3, "ft3": 0.2}.items():
        assert g.merges["dare123"].components[k] == pytest.approx(w, abs=0.1)
    assert set(g.merges["ties12"].components) == {"ft1", "ft2"}
    assert g.relation("ft1", "ft2") == "sibling" and g.relation("ft1", "ft1a") == "child"
    assert g.relation("ft1", "ties12") == "merge of it" and g.relation("ft1", "stranger") == "unrelated"
    d = json.loads(json.dumps(g.to_json()))
    assert d["format"] == "weightsmith.model_graph" and len(d["merges"]) == 3


def test_a_sibling_is_never_the_parent_or_an_ancestor(pool) -> None:
    r = detect_lineage(pool["ft1"], {k: pool[k] for k in ("base", "ft2")})
    assert r.parent == "base" and r.chain == ["base"], r.summary()
    assert r.candidate("ft2").relation in ("sibling", "relative")  # 3 models: no calibrated direction


def test_a_merge_in_the_pool_does_not_hide_the_parent(pool) -> None:
    r = detect_lineage(pool["ft1"], {k: pool[k] for k in ("base", "ft2", "ties12")})
    assert r.parent == "base", r.summary()
    assert "ft2" not in r.chain and "ties12" not in r.chain


def test_descendants_in_the_pool_are_not_named_the_parent(pool) -> None:
    cands = {k: pool[k] for k in ("base", "ft2", "ft3", "ft1a", "ties12", "dare123", "stranger")}
    r = detect_lineage(pool["ft1"], cands)
    assert r.parent == "base", r.summary()
    assert r.candidate("ft1a").relation == "child"
    # too few models to calibrate the direction: descendants are not trusted as such (the answer falls back
    # to the nearest candidate and the path test), but the merge of the child still is not its parent
    r3 = detect_lineage(pool["ft1"], {k: pool[k] for k in ("base", "ties12", "stranger")})
    assert r3.parent == "base", r3.summary()


def test_a_merge_child_is_reported_as_a_merge(pool) -> None:
    r = detect_lineage(pool["lin23"], {k: pool[k] for k in ("base", "ft1", "ft2", "ft3")})
    assert r.parent is None and set(r.merge_of) == {"ft2", "ft3"}, r.summary()
    assert "merge of" in r.reason


def test_bad_pools_get_clear_errors(tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="at least two"):
        recover_model_graph({"a": mlp_state(0)})
    with pytest.raises(InvalidArgumentError, match="direction"):
        recover_model_graph({"a": mlp_state(0), "b": mlp_state(1)}, direction="sideways")
    (tmp_path / "one.safetensors").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="fewer than two models"):
        recover_model_graph(tmp_path)


def test_cli_lineage_graph_on_a_folder(pool, tmp_path) -> None:
    folder = tmp_path / "pool"
    for k in ("base", "ft1", "ft2", "ft3", "lin23", "stranger"):
        (folder / k).mkdir(parents=True)
        save_file(pool[k], folder / k / "model.safetensors")
    pic = tmp_path / "g.svg"
    r = CliRunner().invoke(main, ["lineage", "graph", str(folder), "--tree", str(pic), "-q"])
    assert r.exit_code == 0, r.output
    assert "merge lin23" in r.output and "2 families" in r.output and pic.exists()
    r = CliRunner().invoke(main, ["lineage", "graph", str(folder), "--json", "-q"])
    d = json.loads(r.output)
    assert {e["child"]: e["parent"] for e in d["edges"] if e["kind"] == "fine-tune"}["ft1"] == "base"
    # the default command is still one child's parent
    r = CliRunner().invoke(main, ["lineage", str(folder / "ft1"), "-c", str(folder / "base"), "-q"])
    assert r.exit_code == 0 and "parent:" in r.output


def test_a_permuted_relative_is_flagged_with_the_aligned_hint(pool) -> None:
    from merge.symmetry import mlp_spec
    from metanets.lineage.lookalike import permuted_match
    from metanets.lineage.zoo import permutation_attack

    spec = mlp_spec(pool["ft1"])
    hidden_ft1 = permutation_attack(pool["ft1"], spec, seed=5)
    child = fine_tune(pool["ft1"], 77, 0.3, rank=4, noise=0.1)
    r = detect_lineage(child, {"base": pool["base"], "ft1-permuted": hidden_ft1, "stranger": pool["stranger"]})
    assert r.candidate("ft1-permuted").permuted and not r.candidate("stranger").permuted, r.summary()
    assert "try method 'aligned'" in r.reason and "ft1-permuted" in r.reason
    assert r.candidate("stranger").metrics["row_match"] < 0.6 < 0.9 < r.candidate("ft1-permuted").metrics["row_match"]
    # the statistic is permutation-blind for the copy itself, and low for an independent model
    from merge.checkpoint import StateDictSource

    shared = [k for k in pool["ft1"] if pool["ft1"][k].dim() == 2]
    assert permuted_match(StateDictSource(pool["ft1"]), StateDictSource(hidden_ft1), shared) == pytest.approx(1.0)
