"""Lineage detection: the statistics' math, the open-set answer, alignment, bad input, the result and the CLI.

Small hand-made families (random matrices with low-rank "fine-tuning" updates, tiny LLaMA-named
checkpoints) keep these fast; the zoo-sized checks are in ``test_lineage_zoo.py`` (slow).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from merge.checkpoint import StateDictSource
from merge.errors import InvalidArgumentError, ModelNotFoundError
from merge.symmetry import mlp_spec
from metanets.lineage import detect_lineage
from metanets.lineage.stats import (
    NUCLEAR,
    head_tensors,
    nuclear_norm,
    pair_tensors,
    spectral_block,
    tensor_norms,
)
from metanets.lineage.zoo import permutation_attack
from service.cli.main import main
from tests.conftest import llama_like, write_checkpoint

if TYPE_CHECKING:
    from testkit.hub_server import HubServer

pytest_plugins = ["testkit.hub_server"]


def mlp_state(seed: int, widths=(32, 48, 48, 10)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        sd[f"{2 * i}.weight"] = torch.randn(b, a, generator=g) / math.sqrt(a)
        sd[f"{2 * i}.bias"] = 0.1 * torch.randn(b, generator=g)
    return sd


def fine_tune(
    sd: dict[str, torch.Tensor],
    seed: int,
    scale: float,
    rank: int = 2,
    noise: float = 0.0,
    skip: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """A low-rank update of every matrix (what fine-tuning does), plus optional full-rank noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.dim() == 2 and k not in skip:
            u = torch.randn(v.shape[0], rank, generator=g)
            w = torch.randn(rank, v.shape[1], generator=g)
            d = u @ w
            d = d / d.norm() * scale * v.norm()
            if noise:
                e = torch.randn(v.shape, generator=g)
                d = d + e / e.norm() * noise * v.norm()
            out[k] = v + d
        elif k not in skip:
            out[k] = v + scale * v.norm() / math.sqrt(v.numel()) * torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def family() -> dict[str, dict[str, torch.Tensor]]:
    """root -> 3 siblings (small full-rank moves) -> a child of p0 (a bigger low-rank move); plus strangers."""
    root = mlp_state(0)
    fam = {"root": root}
    for i in range(3):
        fam[f"p{i}"] = fine_tune(root, 10 + i, 0.02, rank=2, noise=0.05)
    fam["child"] = fine_tune(fam["p0"], 99, 0.2, rank=2)
    fam["stranger1"] = mlp_state(1)
    fam["stranger2"] = mlp_state(2)
    return fam


# -- the statistics ---------------------------------------------------------------------------------


def test_nuclear_norm_hand_computed() -> None:
    assert nuclear_norm(torch.diag(torch.tensor([3.0, -4.0]))) == pytest.approx(7.0)
    u, v = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([3.0, 4.0])
    assert nuclear_norm(torch.outer(u, v)) == pytest.approx(3.0 * 5.0)  # rank 1: |u| |v|
    m = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert nuclear_norm(m) == pytest.approx(float(torch.linalg.svdvals(m.double()).sum()), rel=1e-10)
    assert nuclear_norm(m.T) == pytest.approx(nuclear_norm(m), rel=1e-10)


def test_tensor_norms_match_direct_computation_in_bf16_and_with_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import metanets.lineage.stats as st

    monkeypatch.setattr(st, "CHUNK", 100)  # force many chunks
    g = torch.Generator().manual_seed(1)
    c = torch.randn(30, 40, generator=g).to(torch.bfloat16)
    ps = {
        3: (c.float() + 0.01 * torch.randn(30, 40, generator=g)).to(torch.bfloat16),
        5: torch.randn(30, 40, generator=g).to(torch.bfloat16),
    }
    tn = tensor_norms("w", "frobenius", c, ps)
    for i, p in ps.items():
        d = (c.double() - p.double()).norm()
        assert tn.diff[i] == pytest.approx(float(d), rel=1e-5)
        assert tn.fro_rel[i] == pytest.approx(float(d / c.double().norm()), rel=1e-5)
    assert tn.child == pytest.approx(float(c.double().norm()), rel=1e-6)
    # the Gram gives the candidate-candidate distance too: ||p3 - p5||^2 = G33 + G55 - 2 G35
    gm = tn.gram
    d35 = math.sqrt(float(gm[1, 1] + gm[2, 2] - 2 * gm[1, 2]))
    assert d35 == pytest.approx(float((ps[3].double() - ps[5].double()).norm()), rel=1e-5)
    nuc = tensor_norms("w", NUCLEAR, c, ps)
    assert nuc.diff[3] == pytest.approx(nuclear_norm(c.double() - ps[3].double()), rel=1e-9)


def test_vectors_are_centred_so_norm_gains_near_one_do_not_look_alike() -> None:
    g = torch.Generator().manual_seed(2)
    a = 1 + 0.01 * torch.randn(100, generator=g)
    b = 1 + 0.01 * torch.randn(100, generator=g)  # another model's norm gain: unrelated
    tn = tensor_norms("ln.weight", "frobenius", a, {0: b})
    assert tn.diff[0] / tn.child == pytest.approx(math.sqrt(2), rel=0.25)  # not ~0.014


def test_spectral_block_is_the_same_for_every_model_and_exact_when_it_fits() -> None:
    assert spectral_block("a", (64, 64), 256) == (None, None)
    r1, c1 = spectral_block("big.weight", (1000, 300), 256)
    r2, c2 = spectral_block("big.weight", (1000, 300), 256)
    assert torch.equal(r1, r2) and torch.equal(c1, c2) and r1.numel() == 256 and c1.numel() == 256
    assert bool((r1[1:] > r1[:-1]).all())
    r3, _ = spectral_block("other.weight", (1000, 300), 256)
    assert not torch.equal(r1, r3)


def test_heads_and_exclusions_are_reported() -> None:
    llama = llama_like(0)
    assert head_tensors(list(llama), {k: tuple(v.shape) for k, v in llama.items()}) == {"lm_head.weight"}
    mlp = mlp_state(0)
    assert head_tensors(list(mlp), {k: tuple(v.shape) for k, v in mlp.items()}) == {"4.weight", "4.bias"}
    child = dict(mlp) | {"steps": torch.tensor(3), "extra.weight": torch.ones(2, 2)}
    cand = {k: v for k, v in mlp.items() if k != "2.bias"} | {
        "4.weight": torch.zeros(5, 48),
        "4.bias": torch.zeros(5),
        "steps": torch.tensor(4),
    }
    pr = pair_tensors(StateDictSource(child), StateDictSource(cand), heads={"4.weight", "4.bias"})
    assert pr.shared == ["0.bias", "0.weight", "2.weight"]
    assert pr.excluded["2.bias"] == "only in the child"
    assert pr.excluded["steps"] == "not floating point"
    assert pr.excluded["4.weight"].startswith("shape differs")
    assert pr.excluded["extra.weight"] == "only in the child"


# -- ranking and the open-set answer ----------------------------------------------------------------


def test_a_model_and_itself_rank_first_with_distance_zero(family) -> None:
    r = detect_lineage(
        family["child"], {"self": family["child"], "p0": family["p0"], "x": family["stranger1"]}
    )
    assert r.ranking()[0] == "self"
    assert r.candidates[0].score == 0.0
    assert r.parent == "self"


def test_parent_is_found_among_siblings_and_none_when_withheld(family) -> None:
    cands = {k: v for k, v in family.items() if k != "child"}
    r = detect_lineage(family["child"], cands)
    assert r.parent == "p0", r.summary()
    assert r.chain in (["p0"], ["p0", "root"]), r.summary()  # never a sibling as an ancestor
    pure = detect_lineage(family["child"], {k: family[k] for k in ("root", "p0", "stranger1")})
    assert pure.chain == ["p0", "root"], pure.summary()  # a pure chain is followed to the root
    assert not r.candidate("stranger1").related and r.candidate("stranger1").score > 0.9
    assert r.candidates[0].path is not None and r.candidates[0].path >= r.thresholds["path"]
    assert json.loads(json.dumps(r.to_json()))["parent"] == "p0"
    # the parent withheld: its siblings and the root are relatives, not parents
    r2 = detect_lineage(family["child"], {k: v for k, v in cands.items() if k not in ("p0", "root")})
    assert r2.parent is None, r2.summary()
    assert "not an ancestor" in r2.reason
    # only strangers: nothing is related
    r3 = detect_lineage(family["child"], {"a": family["stranger1"], "b": family["stranger2"]})
    assert r3.parent is None and "no candidate is related" in r3.reason


def test_nuclear_norm_separates_siblings_that_frobenius_confuses() -> None:
    """The child's own update is large and low-rank; siblings differ by small full-rank noise."""
    root = mlp_state(5, widths=(64, 64, 64, 10))
    sibs = {f"p{i}": fine_tune(root, 20 + i, 0.005, rank=64, noise=0.02) for i in range(6)}
    hits = {"auto": 0, False: 0}
    for j in range(10):
        child = fine_tune(sibs["p0"], 200 + j, 1.0, rank=1)
        for spectral in hits:
            r = detect_lineage(child, sibs, spectral=spectral)
            hits[spectral] += r.ranking()[0] == "p0"
    assert hits["auto"] == 10
    assert hits[False] <= 7  # measured: 5 of 10 (chance: 1.7)


def test_partially_shared_tensors_are_scored_on_the_shared_ones_and_nothing_shared_is_skipped(family) -> None:
    wider = mlp_state(3, widths=(32, 48, 64, 10))  # another architecture: only the first layer fits
    r = detect_lineage(family["child"], {"p0": family["p0"], "wider": wider, "llama": llama_like(0)})
    assert r.ranking() == ["p0", "wider"]
    w = r.candidate("wider")
    assert 0 < w.coverage < 1 and "2.weight" in w.excluded and not w.related
    assert [s.name for s in r.skipped] == ["llama"] and "no comparable tensors" in r.skipped[0].reason


# -- alignment --------------------------------------------------------------------------------------


def test_aligned_finds_a_permuted_copy_and_reports_it_permuted(family) -> None:
    spec = mlp_spec(family["child"])
    permuted = permutation_attack(family["child"], spec, seed=3)
    ft = permutation_attack(fine_tune(family["child"], 7, 0.05), spec, seed=4)
    cands = {
        "permuted copy": permuted,
        "permuted fine-tune": ft,
        "p1": family["p1"],
        "x": family["stranger1"],
    }
    plain = detect_lineage(family["child"], cands)
    assert not plain.candidate("permuted copy").related  # invisible to position-wise comparison
    r = detect_lineage(family["child"], cands, method="aligned")
    best = r.candidates[0]
    assert best.name == "permuted copy" and best.score < 1e-5
    assert best.permuted and best.fixed_fraction < 0.2
    assert r.candidate("permuted fine-tune").related and r.candidate("permuted fine-tune").permuted
    assert not r.candidate("x").related and not r.candidate("x").permuted
    # an unpermuted relative is not reported as permuted
    r2 = detect_lineage(family["child"], {"p0": family["p0"], "p1": family["p1"]}, method="aligned")
    assert r2.candidate("p0").fixed_fraction > 0.9 and r2.candidate("p0").permuted is False
    assert r2.parent == "p0"


def test_aligned_scores_another_architecture_on_what_it_shares_or_reports_it_incomparable(family) -> None:
    wider = mlp_state(3, widths=(32, 48, 64, 10))  # only the first layer (and its permutation) is shared
    bias_only = {"4.bias": family["child"]["4.bias"].clone()}  # shares no permuted tensor
    r = detect_lineage(
        family["child"],
        {"p0": family["p0"], "wider": wider, "bias only": bias_only},
        method="aligned",
        heads=None,
    )
    assert r.ranking() == ["p0", "wider"]
    assert r.candidate("wider").coverage < 0.5 and not r.candidate("wider").related
    assert [s.name for s in r.skipped] == ["bias only"] and "incomparable" in r.skipped[0].reason


# -- probe --------------------------------------------------------------------------------------------


def test_probe_metrics_math() -> None:
    from metanets.lineage.probe import linear_cka, probe_distances

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale

    def model_fn(sd):
        m = torch.nn.Linear(6, 4)
        m.load_state_dict(sd)
        return m

    parent = torch.nn.Linear(6, 4).state_dict()
    child = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in parent.items()}
    d = probe_distances(child, parent, model_fn, x, alpha=1.0)
    assert d["linearized"] == pytest.approx(
        0.0, abs=1e-6
    )  # a linear model is its own linearisation (float32)
    assert d["l2"] > 0.1
    d0 = probe_distances(child, parent, model_fn, x, alpha_first_order=0.0)
    assert d0["first_order"] == pytest.approx(d0["l2"], rel=1e-6)  # alpha = 0: no approximation step


def test_probe_method_ranks_the_parent_first(family) -> None:
    def model_fn(sd):
        m = torch.nn.Sequential(
            torch.nn.Linear(32, 48),
            torch.nn.ReLU(),
            torch.nn.Linear(48, 48),
            torch.nn.ReLU(),
            torch.nn.Linear(48, 10),
        )
        m.load_state_dict(sd)
        return m[:2]

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    cands = {k: family[k] for k in ("p0", "stranger1", "stranger2")}
    r = detect_lineage(family["child"], cands, method="probe", probe=x, model_fn=model_fn)
    assert r.parent == "p0"
    assert set(r.candidates[0].metrics) == {"linearized", "first_order", "l2", "cka"}
    with pytest.raises(InvalidArgumentError, match="needs probe"):
        detect_lineage(family["child"], cands, method="probe")


# -- bad input ------------------------------------------------------------------------------------------


def test_bad_candidates_are_skipped_with_one_line_each_and_the_rest_ranked(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path
) -> None:
    from merge.hub import HubResolver

    base = llama_like(0)
    ft = llama_like(1, base=base)
    write_checkpoint(tmp_path / "ft", ft)
    write_checkpoint(tmp_path / "base", base)
    hub_server.publish_model("org/base", base, tmp_path / "src")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header....")
    resolver = HubResolver(endpoint=hub_server.url, cache_dir=hf_cache, progress=False)
    r = detect_lineage(
        tmp_path / "ft",
        [
            str(tmp_path / "base"),
            "org/base",
            "org/missing@main",
            str(tmp_path / "garbage.safetensors"),
            str(tmp_path / "nowhere"),
            {"x.weight": torch.ones(3)},
        ],
        resolver=resolver,
    )
    assert r.ranking()[:2] == [str(tmp_path / "base"), "org/base"]
    assert r.candidates[0].score == pytest.approx(r.candidates[1].score)  # the same weights, two ways
    assert r.parent == str(tmp_path / "base")
    reasons = {s.name: s.reason for s in r.skipped}
    assert "org/missing" in reasons["org/missing@main"]
    assert "garbage.safetensors" in reasons[str(tmp_path / "garbage.safetensors")]
    assert "no such local path" in reasons[str(tmp_path / "nowhere")]
    assert "no comparable tensors" in reasons["candidate5"]
    assert all("\n" not in why for why in reasons.values())
    with pytest.raises(ModelNotFoundError):
        detect_lineage(tmp_path / "nothing-here", [str(tmp_path / "base")])


# -- the tree and the CLI ------------------------------------------------------------------------------


def test_tree_renders_png_and_svg(family, tmp_path: Path) -> None:
    r = detect_lineage(family["child"], {k: v for k, v in family.items() if k != "child"})
    png = r.render_tree(tmp_path / "tree.png")
    svg = r.render_tree(tmp_path / "tree.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert "<svg" in text and "p0" in text and "stranger1" in text
    kinds = {(e.a, e.b): e.kind for e in r.tree}
    assert kinds[("child", "p0")] == "chain"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.png", "tree.svg"]  # no temporary left
    with pytest.raises(InvalidArgumentError, match="suffix"):
        r.render_tree(tmp_path / "tree.gif")


def test_cli_lineage(family, tmp_path: Path) -> None:
    for k, v in family.items():
        (tmp_path / k).mkdir()
        save_file(v, tmp_path / k / "model.safetensors")
    p = {k: str(tmp_path / k) for k in family}
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "lineage",
            p["child"],
            "--candidates",
            p["p0"],
            p["p1"],
            p["p2"],
            p["stranger1"],
            "--json",
            "--tree",
            str(tmp_path / "t.svg"),
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["parent"] == p["p0"] and out["answer"] == "parent" and (tmp_path / "t.svg").exists()
    r = runner.invoke(main, ["lineage", p["child"], "-c", p["p1"], p["p2"], p["stranger1"]])
    assert r.exit_code == 0 and "parent: none of the candidates" in r.stdout
    r = runner.invoke(main, ["lineage", p["child"], "-c", p["p0"], "--method", "aligned"])
    assert r.exit_code == 0 and "fixed 1.00" in r.stdout
    r = runner.invoke(main, ["lineage", str(tmp_path / "missing"), "-c", p["p0"]])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    r = runner.invoke(main, ["lineage", p["child"]])
    assert r.exit_code == 2 and "no candidates" in r.stderr


def test_lineage_methods_are_one_registry() -> None:
    """The library, the CLI and the service list the lineage methods from one registry."""
    from metanets.lineage.methods import get_lineage_method, lineage_methods
    from service.cli.lineage import lineage

    names = [m.name for m in lineage_methods()]
    assert names == ["weights", "aligned", "probe", "learned"]
    assert [m.name for m in lineage_methods(served=True)] == ["weights", "aligned", "learned"]  # probe runs user code
    method_opt = next(p for p in lineage.params if p.name == "method")
    assert list(method_opt.type.choices) == names
    with pytest.raises(InvalidArgumentError, match="known: weights, aligned, probe, learned"):
        get_lineage_method("nope")
    assert get_lineage_method("weights").reads_weights and not get_lineage_method("learned").open_set_by_threshold
    with pytest.raises(InvalidArgumentError, match="method 'learned' needs detector"):
        detect_lineage(mlp_state(0), [mlp_state(1)], method="learned")
