"""OPCM (merge/soups/opcm.py) and OPCM soup folders (merge/soups/folder.py, method "opcm").

Tang et al., "Merging Models on the Fly Without Retraining" (arXiv:2501.09522). The expectations are
worked by hand on matrices built from unit vectors: e_i (rows) and f_j (columns).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from merge.checkpoint import open_checkpoint
from merge.errors import (
    InvalidArgumentError,
    MissingTensorError,
    ModelNotFoundError,
    NonFiniteError,
    ShapeMismatchError,
    SoupError,
)
from merge.soups.folder import Soup
from merge.soups.opcm import ContinualOPCM, opcm_merge, project, split_rank, step_stats
from tests.conftest import llama_like, tree_digest, write_checkpoint


def unit(m: int, n: int, *entries: tuple[int, int, float]) -> torch.Tensor:
    """An m × n float64 matrix with the given (row, column, value) entries: Σ v e_i f_jᵀ."""
    w = torch.zeros(m, n, dtype=torch.float64)
    for i, j, v in entries:
        w[i, j] = v
    return w


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(folder)
    return {k: c[k] for k in c}


def assert_bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


# ---------------------------------------------------------------------------------------------
# the rule, by hand
# ---------------------------------------------------------------------------------------------


def test_split_rank_by_hand() -> None:
    # σ = 4, 3, 2, 1 (Σ = 10); cumulative 4, 7, 9, 10: r = the fewest leading values reaching α·10
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    got = {a: split_rank(s, a) for a in (0.0, 0.3, 0.4, 0.41, 0.7, 0.71, 0.9, 0.95, 1.0)}
    assert got == {0.0: 0, 0.3: 1, 0.4: 1, 0.41: 2, 0.7: 2, 0.71: 3, 0.9: 3, 0.95: 4, 1.0: 4}


def test_one_task_is_the_fine_tune_itself() -> None:
    # λ_1 = ‖S_1‖ / ‖τ_1‖ = 1 and S_1 = τ_1 (nothing to project against): θ^(1) = θ_0 + τ_1 = θ_1
    base = llama_like(0)
    ft = llama_like(1, base=base) | {"model.norm.weight": base["model.norm.weight"] + 1.5}
    run = ContinualOPCM(base)
    step = run.add(ft)
    assert step.lam == 1.0 and step.kept == 1.0 and step.step == 1
    tau = math.sqrt(sum(float(((ft[k].double() - base[k].double()) ** 2).sum()) for k in sorted(base)))
    assert step.task_norm == pytest.approx(tau, rel=1e-12) and step.sum_norm == step.task_norm
    assert_bits_equal(run.merged(), ft)
    assert_bits_equal(opcm_merge(base, [ft]), ft)


def test_a_task_vector_inside_the_merged_subspace_is_projected_to_zero() -> None:
    # τ_1 = 3 e_0 f_0ᵀ + 1 e_1 f_1ᵀ: σ = (3, 1), u = e_0, e_1, v = f_0, f_1 (up to signs, which the
    # block and diagonal masks do not see). τ_2 = 4 e_0 f_0ᵀ + 2 e_0 f_1ᵀ + 5 e_1 f_0ᵀ lies in the
    # span of u_i v_jᵀ, i, j ≤ 2.
    s1 = unit(4, 3, (0, 0, 3.0), (1, 1, 1.0))
    tau = unit(4, 3, (0, 0, 4.0), (0, 1, 2.0), (1, 0, 5.0))
    # α = 0.9: Σσ·α = 3.6 > 3, so r = 2: the whole 2 × 2 block goes, τ_2 is projected to 0
    torch.testing.assert_close(project(s1, tau, 0.9), torch.zeros(4, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    # α = 0.5 (r = 1) and α = 0 (r = 0): only the diagonal (the components along u_i v_iᵀ) goes; the
    # cross terms 2 e_0 f_1ᵀ and 5 e_1 f_0ᵀ are kept
    for a in (0.5, 0.0):
        torch.testing.assert_close(
            project(s1, tau, a), unit(4, 3, (0, 1, 2.0), (1, 0, 5.0)), rtol=0, atol=1e-12
        )
    # a multiple of the merged update itself is all diagonal: gone whatever α
    for a in (0.0, 0.5, 1.0):
        torch.testing.assert_close(project(s1, 2.5 * s1, a), torch.zeros(4, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    # through the merge: W = θ_0 + (τ_1 + 0) / λ_2 with λ_2 = ‖τ_1‖ / ((‖τ_1‖ + ‖τ_2‖)/2)
    base = {"w": torch.zeros(4, 3, dtype=torch.float64)}
    run = ContinualOPCM(base, alpha=0.9)
    run.add({"w": s1})
    step = run.add({"w": tau})
    n1, n2 = math.sqrt(10.0), math.sqrt(45.0)
    assert step.kept == pytest.approx(0.0, abs=1e-12)
    assert step.lam == pytest.approx(math.sqrt(10.0) / ((n1 + n2) / 2), rel=1e-12)
    torch.testing.assert_close(run.merged()["w"], s1 * (n1 + n2) / 2 / math.sqrt(10.0), rtol=1e-12, atol=1e-12)


def test_an_orthogonal_task_vector_is_kept_whole_and_lambda_is_sqrt_t() -> None:
    # τ_1 = 3 e_0 f_0ᵀ has rank 1: only u_0 = e_0, v_0 = f_0 are real directions (the rest of a full SVD
    # would be an arbitrary completion). τ_2 = 4 e_1 f_1ᵀ + 1 e_2 f_0ᵀ has no component in e_0 (rows), so
    # every coefficient u_0ᵀ τ_2 v_j is 0: it is kept whole, for any α.
    s1 = unit(4, 3, (0, 0, 3.0))
    tau = unit(4, 3, (1, 1, 4.0), (2, 0, 1.0))
    for a in (0.0, 0.5, 1.0):
        torch.testing.assert_close(project(s1, tau, a), tau, rtol=0, atol=1e-12)
    # the adaptive scaling on t mutually orthogonal task vectors of equal norm: ‖S_t‖ = √t·n, mean = n, λ_t = √t
    base = {"w": torch.zeros(4, 4)}
    run = ContinualOPCM(base)
    for t in range(4):
        step = run.add({"w": torch.diag(torch.tensor([2.0 if i == t else 0.0 for i in range(4)]))})
        assert step.lam == pytest.approx(math.sqrt(t + 1), rel=1e-12) and step.kept == pytest.approx(1.0)
    # θ^(4) = θ_0 + diag(2, 2, 2, 2) / 2: the merged update keeps the average task-vector norm (2)
    torch.testing.assert_close(run.merged()["w"], torch.eye(4), rtol=0, atol=1e-6)


def test_the_scaling_rule_by_hand_with_a_bias() -> None:
    # W: τ_1 = 3 e_0 f_0ᵀ, τ_2 = 12 e_0 f_0ᵀ (along the merged update: projected to 0);
    # b (not a matrix: never projected, summed): τ_1 = (0, 4), τ_2 = (5, 0).
    # ‖τ_1‖ = 5, ‖τ_2‖ = 13; S_2 = (3 e_0 f_0ᵀ, (5, 4)), ‖S_2‖ = √50; mean = 9; λ_2 = √50 / 9 < 1.
    base = {"w": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    m1 = {"w": unit(2, 2, (0, 0, 3.0)), "b": torch.tensor([0.0, 4.0], dtype=torch.float64)}
    m2 = {"w": unit(2, 2, (0, 0, 12.0)), "b": torch.tensor([5.0, 0.0], dtype=torch.float64)}
    run = ContinualOPCM(base, alpha=0.5)
    s1, s2 = run.add(m1, "a"), run.add(m2, "b")
    assert (s1.task_norm, s1.lam, s1.kept) == (5.0, 1.0, 1.0)
    assert s2.task_norm == 13.0
    assert s2.kept == pytest.approx(5 / 13, rel=1e-12)  # only the bias survived
    assert s2.sum_norm == pytest.approx(math.sqrt(50), rel=1e-12)
    assert s2.lam == pytest.approx(math.sqrt(50) / 9, rel=1e-12)
    merged = run.merged()
    scale = 9 / math.sqrt(50)
    torch.testing.assert_close(merged["w"], unit(2, 2, (0, 0, 3 * scale)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged["b"], torch.tensor([5 * scale, 4 * scale], dtype=torch.float64))
    # the merged update's norm is the average task-vector norm
    norm = math.sqrt(float((merged["w"] ** 2).sum() + (merged["b"] ** 2).sum()))
    assert norm == pytest.approx(9.0, rel=1e-12)
    # step_stats is the same rule on numbers
    assert step_stats([5.0], 169.0, 25.0, 50.0).lam == pytest.approx(math.sqrt(50) / 9)


@pytest.mark.parametrize("seed", range(3))
def test_projection_properties_on_random_matrices(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(12, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 9, generator=g, dtype=torch.float64)
    tau = torch.randn(12, 9, generator=g, dtype=torch.float64)
    alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
    kept = [project(prev, tau, a) for a in alphas]
    for a, p in zip(alphas, kept, strict=True):
        # orthogonal to the merged update (Frobenius), and a projection: P(P(τ)) = P(τ)
        assert abs(float((p * prev).sum())) < 1e-10 * float(prev.norm() * tau.norm())
        torch.testing.assert_close(project(prev, p, a), p, rtol=0, atol=1e-10)
    norms = [float(p.norm()) for p in kept]
    assert norms == sorted(norms, reverse=True) and norms[0] < float(tau.norm())
    # α = 1: r = rank, the whole block U Uᵀ τ V Vᵀ is removed (it contains the diagonal)
    u, s, vh = torch.linalg.svd(prev, full_matrices=False)
    u, vh = u[:, :5], vh[:5]
    torch.testing.assert_close(kept[-1], tau - u @ u.T @ tau @ vh.T @ vh, rtol=0, atol=1e-10)
    # a zero merged update keeps everything
    assert torch.equal(project(torch.zeros(12, 9, dtype=torch.float64), tau, 0.5), tau)


def test_opcm_merge_equals_the_continual_run_and_takes_a_generator() -> None:
    base = llama_like(0)
    ms = [llama_like(i, base=base, noise=0.01 * i) for i in (1, 2, 3)]
    run = ContinualOPCM(base, 0.3)
    for m in ms:
        run.add(m)
    got = opcm_merge(base, (m for m in ms), alpha=0.3)
    assert_bits_equal(got, run.merged())
    assert got["lm_head.weight"].dtype == torch.float32
    assert opcm_merge(base, ms, 0.3, dtype=torch.bfloat16)["lm_head.weight"].dtype == torch.bfloat16
    # order matters (the projection is order-dependent)
    rev = opcm_merge(base, ms[::-1], alpha=0.3)
    assert not torch.equal(rev["lm_head.weight"], got["lm_head.weight"])
    # the inputs are not modified
    assert torch.equal(base["lm_head.weight"], llama_like(0)["lm_head.weight"])


def test_bad_input_is_a_clear_error() -> None:
    base = llama_like(0)
    ok = llama_like(1, base=base)
    for bad in (-0.1, 1.5, float("nan"), "0.5", True, None):
        with pytest.raises(InvalidArgumentError, match=r"OPCM alpha .*: must be a number in \[0, 1\]"):
            opcm_merge(base, [ok], alpha=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="no models"):
        opcm_merge(base, [])
    with pytest.raises(MissingTensorError, match="b: tensor 'lm_head.weight' is missing"):
        opcm_merge(base, [ok, {k: v for k, v in ok.items() if k != "lm_head.weight"}], names=["a", "b"])
    with pytest.raises(MissingTensorError, match="model 1: tensor 'extra' is not in the base"):
        opcm_merge(base, [ok, ok | {"extra": torch.zeros(2)}])
    with pytest.raises(ShapeMismatchError, match=r"model 0: tensor 'lm_head.weight' has shape \[4, 4\], expected"):
        opcm_merge(base, [ok | {"lm_head.weight": torch.zeros(4, 4)}])
    nan = dict(ok)
    nan["model.norm.weight"] = nan["model.norm.weight"].clone()
    nan["model.norm.weight"][2] = float("nan")
    run = ContinualOPCM(base)
    run.add(ok)
    before = {k: v.clone() for k, v in run.sums.items()}
    with pytest.raises(NonFiniteError, match="m2: tensor 'model.norm.weight' has 1 NaN/Inf"):
        run.add(nan, "m2")
    assert len(run.steps) == 1 and all(torch.equal(before[k], run.sums[k]) for k in before)  # unchanged


# ---------------------------------------------------------------------------------------------
# the OPCM soup folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, list[Path], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = llama_like(0) | {"model.pos_ids": torch.arange(5)}
    sds = [llama_like(i, base=base, noise=0.01 * i) | {"model.pos_ids": torch.arange(5) + i} for i in (1, 2, 3, 4)]
    bp = write_checkpoint(tmp_path / "base", base, shards=2, config={"model_type": "base"})
    paths = [write_checkpoint(tmp_path / f"m{i}", sd) for i, sd in enumerate(sds, 1)]
    return bp, paths, base, sds


def test_soup_add_one_by_one_equals_opcm_merge_bit_for_bit(tmp_path: Path, models) -> None:
    bp, paths, base, sds = models
    s = Soup.init(tmp_path / "soup", [], base=bp, method="opcm", alpha=0.4)
    for p in paths[:3]:
        s.add(p)
    info = s.build(tmp_path / "out")
    lib = opcm_merge(base, sds[:3], alpha=0.4)
    assert_bits_equal(tensors(tmp_path / "out"), lib)
    assert torch.equal(tensors(tmp_path / "out")["model.pos_ids"], torch.arange(5))  # non-float: the base's
    assert (tmp_path / "out" / "config.json").read_text() == (bp / "config.json").read_text()
    assert info["method"] == "opcm" and info["alpha"] == 0.4
    # init with all three replays the same steps: the same state files and figures
    t = Soup.init(tmp_path / "all", paths[:3], base=bp, method="opcm", alpha=0.4)
    assert t.manifest["state"]["files"] == s.manifest["state"]["files"]
    assert t.manifest["opcm"]["steps"] == s.manifest["opcm"]["steps"]
    run = ContinualOPCM(base, 0.4)
    steps = [run.add(m, f"m{i}").to_json() for i, m in enumerate(sds[:3], 1)]
    assert s.manifest["opcm"]["steps"] == steps and s.manifest["opcm"]["lambda"] == run.lam
    # the manifest: version 2, method opcm; the soup id depends on alpha and on the order
    m = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert (m["version"], m["method"]) == (2, "opcm")
    other = Soup.init(tmp_path / "a5", paths[:3], base=bp, method="opcm")
    assert other.alpha == 0.5 and other.soup_id != s.soup_id
    assert Soup.init(tmp_path / "rev", paths[2::-1], base=bp, method="opcm", alpha=0.4).soup_id != s.soup_id
    # show lists the steps
    shown = s.show()
    assert [x["name"] for x in shown["opcm"]["steps"]] == ["m1", "m2", "m3"] and shown["method"] == "opcm"


def test_soup_remove_replays_the_others_exactly(tmp_path: Path, models) -> None:
    bp, paths, base, sds = models
    s = Soup.init(tmp_path / "soup", paths[:3], base=bp, method="opcm")
    before = s.manifest["state"]["files"]
    s.add(paths[3])
    s.remove("m4")  # add-then-remove restores the previous state bit for bit
    assert s.manifest["state"]["files"] == before
    s.remove("m2")  # a middle member: OPCM replayed over m1, m3 in order
    s.build(tmp_path / "out")
    assert_bits_equal(tensors(tmp_path / "out"), opcm_merge(base, [sds[0], sds[2]]))
    scratch = Soup.init(tmp_path / "scratch", [paths[0], paths[2]], base=bp, method="opcm")
    assert scratch.manifest["state"]["files"] == s.manifest["state"]["files"]
    assert scratch.soup_id == s.soup_id
    ops = [(e["op"], e.get("member")) for e in s.manifest["history"]]
    assert ops == [("init", None), ("add", "m4"), ("remove", "m4"), ("remove", "m2")]
    s.remove("m1")
    s.remove("m3")
    assert s.manifest["state"] is None and s.manifest["opcm"]["steps"] == []
    with pytest.raises(SoupError, match="no members"):
        s.build(tmp_path / "empty")


def test_build_needs_only_the_base_and_the_state_remove_needs_the_members(tmp_path: Path, models) -> None:
    bp, paths, base, sds = models
    s = Soup.init(tmp_path / "soup", paths[:2], base=bp, method="opcm")
    shutil.rmtree(paths[0])  # a merged model need not be kept: the build does not read it
    s.build(tmp_path / "out")
    assert_bits_equal(tensors(tmp_path / "out"), opcm_merge(base, sds[:2]))
    digest = tree_digest(tmp_path / "soup")
    with pytest.raises(ModelNotFoundError, match="soup member 'm1': .*m1 is missing from disk"):
        s.remove("m2")  # the replay needs it
    assert tree_digest(tmp_path / "soup") == digest


def test_opcm_soup_errors_leave_it_unchanged(tmp_path: Path, models) -> None:
    bp, paths, base, sds = models
    with pytest.raises(SoupError, match="an OPCM soup needs a base"):
        Soup.init(tmp_path / "nobase", paths[:1], method="opcm")
    with pytest.raises(InvalidArgumentError, match=r"OPCM alpha 2.0: must be a number in \[0, 1\]"):
        Soup.init(tmp_path / "alpha", paths[:1], base=bp, method="opcm", alpha=2.0)
    with pytest.raises(InvalidArgumentError, match="alpha is a parameter of OPCM soups"):
        Soup.init(tmp_path / "avg", paths[:1], alpha=0.5)
    with pytest.raises(SoupError, match="soup method 'ties'"):
        Soup.init(tmp_path / "m", paths[:1], method="ties")
    with pytest.raises(SoupError, match="OPCM soups have no member weights"):
        Soup.init(tmp_path / "w", paths[:1], weights=[2.0], base=bp, method="opcm")
    assert not any((tmp_path / n).exists() for n in ("nobase", "alpha", "avg", "m", "w"))
    s = Soup.init(tmp_path / "soup", paths[:1], base=bp, method="opcm")
    digest = tree_digest(tmp_path / "soup")
    with pytest.raises(SoupError, match="member 'm2': OPCM soups have no member weights"):
        s.add(paths[1], weight=0.5)
    wide = write_checkpoint(tmp_path / "wide", llama_like(9, hidden=20) | {"model.pos_ids": torch.arange(5)})
    with pytest.raises(ShapeMismatchError, match="as in the base"):
        s.add(wide)
    nan = dict(sds[1])
    nan["lm_head.weight"] = nan["lm_head.weight"].clone()
    nan["lm_head.weight"][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="soup member 'nan'.*lm_head.weight"):
        s.add(write_checkpoint(tmp_path / "nan", nan))
    assert tree_digest(tmp_path / "soup") == digest
    # an averaging soup is as it was: version 1, method average
    a = Soup.init(tmp_path / "average", paths[:2])
    m = json.loads((tmp_path / "average" / "soup.json").read_text())
    assert (m["version"], m["method"], a.alpha) == (1, "average", None)


def test_cli_opcm_soup(tmp_path: Path, models) -> None:
    from service.cli.main import main

    bp, paths, base, sds = models
    soup = str(tmp_path / "soup")
    r = CliRunner().invoke(main, ["soup", "init", soup, "--base", str(bp), "--method", "opcm", "--alpha", "0.6"])
    assert r.exit_code == 0, r.output
    for p in paths[:2]:
        r = CliRunner().invoke(main, ["soup", "add", soup, str(p)])
        assert r.exit_code == 0 and "OPCM step" in r.output, r.output
    r = CliRunner().invoke(main, ["soup", "show", soup])
    assert r.exit_code == 0 and "OPCM (alpha 0.6)" in r.output, r.output
    lines = [ln.split() for ln in r.output.splitlines() if ln.strip().startswith(("1 ", "2 "))]
    assert [ln[1] for ln in lines] == ["m1", "m2"] and lines[0][3] == "100.0%"
    r = CliRunner().invoke(main, ["soup", "build", soup, "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and "built OPCM soup" in r.output, r.output
    assert_bits_equal(tensors(tmp_path / "out"), opcm_merge(base, sds[:2], alpha=0.6))
    r = CliRunner().invoke(main, ["soup", "add", soup, str(paths[2]), "--weight", "3"])
    assert r.exit_code == 2 and "OPCM soups have no member weights" in r.output
    r = CliRunner().invoke(main, ["soup", "init", str(tmp_path / "x"), "--base", str(bp), "--method", "opcm",
                                  "--alpha", "-1"])  # fmt: skip
    assert r.exit_code == 2 and "must be a number in [0, 1]" in r.output


def test_opcm_soup_of_diffusers_pipelines(tmp_path: Path) -> None:
    """Every component is one part of the model: one λ for all; an unchanged component (the VQ-VAE) has
    S = 0 and is built as the base's, bit for bit; the pipeline loads back through diffusers."""
    from diffusers import DiffusionPipeline, UNet2DModel, VQModel

    from tests.merge.test_soup import _pipelines

    ps = _pipelines(tmp_path, 3)
    s = Soup.init(tmp_path / "soup", [ps[1]], base=ps[0], method="opcm")
    s.add(ps[2])
    info = s.build(tmp_path / "out")
    assert info["summed"] == ["unet", "vqvae"]

    def flat(p: Path) -> dict[str, torch.Tensor]:
        return {f"unet/{k}": v for k, v in UNet2DModel.from_pretrained(p / "unet").state_dict().items()} | {
            f"vqvae/{k}": v for k, v in VQModel.from_pretrained(p / "vqvae").state_dict().items()
        }

    want = opcm_merge(flat(ps[0]), [flat(ps[1]), flat(ps[2])])
    got = flat(tmp_path / "out")
    assert_bits_equal({k: got[k] for k in want}, want)
    base = flat(ps[0])
    assert all(torch.equal(got[k], base[k]) for k in got if k.startswith("vqvae/"))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 4, 4, 1)
