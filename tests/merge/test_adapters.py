"""LoRA adapters: factor algebra, PEFT / kohya / diffusers files, folding, merging, extraction, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from merge.checkpoint import open_checkpoint
from merge.errors import (
    AdapterError,
    MissingTensorError,
    PickleRefusedError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from merge.lora.algebra import extract_adapter, merge_adapters, residual_cosines
from merge.lora.bind import FoldedCheckpoint, split_reference
from merge.lora.factors import (
    Factors,
    cat_factors,
    combine_residuals,
    linear_factors,
    lora_scale,
    truncated_svd,
)
from merge.lora.formats import read_adapter
from service.cli.main import main

G = torch.Generator().manual_seed(0)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


# ---------------------------------------------------------------------------------------------
# factor algebra
# ---------------------------------------------------------------------------------------------
def test_scale_rules() -> None:
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0


def test_cat_is_the_exact_weighted_sum_and_linear_reproduces_one_adapter() -> None:
    p1, p2 = Factors(rnd(3, 5), rnd(4, 3), 2.0), Factors(rnd(2, 5), rnd(4, 2), 0.5)
    c = cat_factors([p1, p2], [0.3, -1.5])
    assert c.rank == 5 and c.scale == 1.0
    torch.testing.assert_close(c.delta(), 0.3 * p1.delta() - 1.5 * p2.delta(), rtol=1e-6, atol=1e-6)
    one = linear_factors([p1], [-0.7])
    torch.testing.assert_close(one.delta(), -0.7 * p1.delta(), rtol=1e-6, atol=1e-6)
    # linear on two adapters is the product of the factor sums (cross terms), not the residual sum
    q = Factors(rnd(3, 5), rnd(4, 3), 1.0)
    lin = linear_factors([p1, q], [1.0, 1.0])
    a = p1.A * 2**0.5 + q.A
    b = p1.B * 2**0.5 + q.B
    torch.testing.assert_close(lin.delta(), b @ a, rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeMismatchError, match="equal ranks"):
        linear_factors([p1, p2], [1.0, 1.0])
    with pytest.raises(ShapeMismatchError, match="adapter 1 adapts a 4 × 6"):
        cat_factors([p1, Factors(rnd(2, 6), rnd(4, 2))], [1.0, 1.0])


def test_truncated_svd_full_rank_is_exact_and_energy_is_eckart_young() -> None:
    d = rnd(12, 7)
    full = truncated_svd(d, 99)
    assert full.factors.rank == 7 and full.energy == pytest.approx(1.0)
    torch.testing.assert_close(full.factors.delta(), d, rtol=1e-5, atol=1e-5)
    s = torch.linalg.svdvals(d.double())
    for k in (1, 3):
        t = truncated_svd(d, k)
        assert t.energy == pytest.approx(float((s[:k] ** 2).sum() / (s**2).sum()), rel=1e-9)
        err = float((t.factors.delta().double() - d.double()).norm() / d.double().norm())
        assert t.rel_error == pytest.approx(err, rel=1e-5)
        assert t.rel_error**2 + t.energy == pytest.approx(1.0, abs=1e-9)
    low = rnd(9, 2) @ rnd(2, 6)  # rank 2: a rank-2 truncation is exact
    torch.testing.assert_close(truncated_svd(low, 2).factors.delta(), low, rtol=1e-5, atol=1e-5)


def test_lowrank_svd_equals_dense_svd_of_the_sum() -> None:
    from merge.lora.factors import lowrank_svd

    parts = [Factors(rnd(3, 9), rnd(11, 3), 2.0), Factors(rnd(4, 9), rnd(11, 4), 0.5)]
    dense = 0.7 * parts[0].delta() - 0.2 * parts[1].delta()
    for k in (2, 5, 7, 20):
        lo, hi = lowrank_svd(parts, [0.7, -0.2], k), truncated_svd(dense, k)
        assert lo.factors.rank == min(k, 7) and hi.factors.rank == min(k, 9)
        torch.testing.assert_close(lo.factors.delta(), hi.factors.delta(), rtol=1e-5, atol=1e-5)
        assert lo.energy == pytest.approx(hi.energy, rel=1e-7) and lo.rel_error == pytest.approx(hi.rel_error, abs=1e-6)
    torch.testing.assert_close(lowrank_svd(parts, [0.7, -0.2], 7).factors.delta(), dense, rtol=1e-5, atol=1e-5)


def test_ties_on_residuals_by_hand() -> None:
    d1 = torch.tensor([[3.0, -1.0, 0.5]])
    d2 = torch.tensor([[-1.0, -2.0, 0.25]])
    # density 1: signs elected from the sum (+, -, +); disjoint mean over agreeing entries
    out = combine_residuals([d1, d2], [1.0, 1.0], "ties", density=1.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, -1.5, 0.375]]))
    torch.testing.assert_close(combine_residuals([d1, d2], [2.0, 1.0], "sum"), 2 * d1 + d2)
    # magnitude pruning at density 1/3 keeps the single largest |entry| of each
    mp = combine_residuals([d1, d2], [1.0, 1.0], "magnitude_prune", density=1 / 3)
    torch.testing.assert_close(mp, torch.tensor([[3.0, -2.0, 0.0]]))


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _base(tmp: Path, tensors: dict[str, torch.Tensor]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    return tmp


def _peft(folder: Path, tensors: dict[str, torch.Tensor], **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"], **cfg}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_kohya_file_folds_by_underscore_names(tmp_path: Path) -> None:
    base = _base(
        tmp_path / "sd",
        {
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": rnd(6, 4, 1, 1),  # 1x1 conv
            "model.diffusion_model.input_blocks.1.0.conv.weight": rnd(6, 3, 3, 3),
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight": rnd(5, 5),
            "model.diffusion_model.out.weight": rnd(2, 2),
        },
    )
    down1, up1 = rnd(2, 4), rnd(6, 2)
    down2, up2 = rnd(2, 3, 3, 3), rnd(6, 2, 1, 1)
    down3, up3 = rnd(1, 5), rnd(5, 1)
    save_file(
        {
            "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down1,
            "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up1,
            "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0),
            "lora_unet_input_blocks_1_0_conv.lora_down.weight": down2,
            "lora_unet_input_blocks_1_0_conv.lora_up.weight": up2,
            "lora_unet_input_blocks_1_0_conv.alpha": torch.tensor(4.0),
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": down3,
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": up3,  # no alpha: scale 1
        },
        str(tmp_path / "style.safetensors"),
    )
    ad = read_adapter(tmp_path / "style.safetensors")
    assert ad.format == "kohya" and len(ad.targets) == 3
    b = open_checkpoint(base)
    f = FoldedCheckpoint(b, [ad], [0.5])
    w = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    torch.testing.assert_close(f[w], b[w] + 0.5 * 0.5 * (up1 @ down1).reshape(6, 4, 1, 1))
    w = "model.diffusion_model.input_blocks.1.0.conv.weight"
    want = b[w] + 0.5 * 2.0 * (up2.flatten(1) @ down2.flatten(1)).reshape(6, 3, 3, 3)
    torch.testing.assert_close(f[w], want)
    w = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(f[w], b[w] + 0.5 * up3 @ down3)
    assert torch.equal(f["model.diffusion_model.out.weight"], b["model.diffusion_model.out.weight"])
    # two kohya files merge into a kohya file (cat: exact)
    out = tmp_path / "merged.safetensors"
    merge_adapters([ad, tmp_path / "style.safetensors"], out, method="cat", weights=[1.0, 1.0])
    m = read_adapter(out)
    assert m.format == "kohya"
    for mod in ad.targets:
        torch.testing.assert_close(m.delta(mod), 2 * ad.delta(mod), rtol=1e-5, atol=1e-6)


def test_kohya_name_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    _base(tmp_path / "b", {"blocks.0.attn.weight": rnd(3, 3)})
    save_file(
        {
            "lora_unet_blocks_1_attn.lora_down.weight": rnd(1, 3),
            "lora_unet_blocks_1_attn.lora_up.weight": rnd(3, 1),
        },
        str(tmp_path / "l.safetensors"),
    )
    with pytest.raises(MissingTensorError, match="lora_unet_blocks_1_attn' matches no weight"):
        FoldedCheckpoint(open_checkpoint(tmp_path / "b"), [read_adapter(tmp_path / "l.safetensors")])


def test_diffusers_files_both_namings(tmp_path: Path) -> None:
    base = _base(
        tmp_path / "unet",
        {
            "mid.attn1.to_q.weight": rnd(4, 4),
            "mid.attn1.to_out.0.weight": rnd(4, 4),
            "mid.attn1.to_k.weight": rnd(4, 4),
        },
    )
    d, u = rnd(2, 4), rnd(4, 2)
    save_file(
        {
            "unet.mid.attn1.processor.to_q_lora.down.weight": d,
            "unet.mid.attn1.processor.to_q_lora.up.weight": u,
            "unet.mid.attn1.processor.to_out_lora.down.weight": d.clone(),
            "unet.mid.attn1.processor.to_out_lora.up.weight": u.clone(),
            "unet.mid.attn1.to_k.lora.down.weight": d.clone(),
            "unet.mid.attn1.to_k.lora.up.weight": u.clone(),
        },
        str(tmp_path / "old.safetensors"),
    )
    ad = read_adapter(tmp_path / "old.safetensors")
    assert ad.format == "diffusers" and sorted(ad.targets) == [
        "unet.mid.attn1.to_k",
        "unet.mid.attn1.to_out.0",
        "unet.mid.attn1.to_q",
    ]
    b = open_checkpoint(base)
    f = FoldedCheckpoint(b, [ad])  # 'unet.' is dropped to match the base's names
    for n in ("mid.attn1.to_q.weight", "mid.attn1.to_out.0.weight", "mid.attn1.to_k.weight"):
        torch.testing.assert_close(f[n], b[n] + u @ d)
    save_file(
        {
            "unet.mid.attn1.to_q.lora_A.weight": d,
            "unet.mid.attn1.to_q.lora_B.weight": u,
            "unet.mid.attn1.to_q.alpha": torch.tensor(4.0),
        },
        str(tmp_path / "new.safetensors"),
    )
    f = FoldedCheckpoint(b, [read_adapter(tmp_path / "new.safetensors")])
    torch.testing.assert_close(f["mid.attn1.to_q.weight"], b["mid.attn1.to_q.weight"] + 2.0 * u @ d)


def test_rank_and_alpha_patterns_and_prefix_mapping(tmp_path: Path) -> None:
    base = _base(tmp_path / "b", {"bert.layer.0.q.weight": rnd(4, 6), "bert.layer.1.q.weight": rnd(4, 6)})
    a0, b0, a1, b1 = rnd(2, 6), rnd(4, 2), rnd(3, 6), rnd(4, 3)
    ad = _peft(
        tmp_path / "a",
        {
            "base_model.model.layer.0.q.lora_A.weight": a0,
            "base_model.model.layer.0.q.lora_B.weight": b0,
            "base_model.model.layer.1.q.lora_A.weight": a1,
            "base_model.model.layer.1.q.lora_B.weight": b1,
        },
        r=2,
        lora_alpha=4,
        rank_pattern={"layer.1.q": 3},
        alpha_pattern={"1.q": 6},
        use_rslora=False,
    )
    a = read_adapter(ad)
    assert a.targets["layer.0.q"].scale == 2.0 and a.targets["layer.1.q"].scale == 2.0  # 4/2 and 6/3
    f = FoldedCheckpoint(
        open_checkpoint(base), [a]
    )  # the adapter was trained on the inner model: add 'bert.'
    torch.testing.assert_close(
        f["bert.layer.1.q.weight"], open_checkpoint(base)["bert.layer.1.q.weight"] + 2 * b1 @ a1
    )
    assert split_reference(f"{base}+{ad}:0.25") == (str(base), [(str(ad), 0.25)])
    assert split_reference(str(base)) is None


def test_base_plus_adapter_in_a_recipe_with_a_weight(tmp_path: Path) -> None:
    w = rnd(5, 3)
    base = _base(tmp_path / "base", {"fc.weight": w, "fc.bias": rnd(5)})
    A, B = rnd(2, 3), rnd(5, 2)
    ad = _peft(
        tmp_path / "ad", {"base_model.model.fc.lora_A.weight": A, "base_model.model.fc.lora_B.weight": B}
    )
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": f"{base}+{ad}:0.5"}]})
    )
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["models"][0]
    assert rec["adapters"][0]["weight"] == 0.5
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(got["fc.weight"], w + 0.5 * 2.0 * B @ A)
    # a task-arithmetic merge of two folded references works like any other models
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [
                    {"model": f"{base}+{ad}", "parameters": {"weight": 0.5}},
                    {"model": f"{base}+{ad}:-1", "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "ta"), "--json"])
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(
        load_file(str(tmp_path / "ta" / "model.safetensors"))["fc.weight"], w, atol=1e-6, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ---------------------------------------------------------------------------------------------
GOOD = {
    "base_model.model.fc.lora_A.weight": torch.ones(2, 3),
    "base_model.model.fc.lora_B.weight": torch.ones(5, 2),
}


@pytest.mark.parametrize(
    "case",
    [
        "dora",
        "loha",
        "json",
        "no_r",
        "rank",
        "lora_bias",
        "pissa",
        "lycoris",
        "target",
        "shape",
        "pickle",
        "partner",
    ],
)
def test_bad_adapters_fail_clearly_and_write_nothing(tmp_path: Path, case: str) -> None:
    base = _base(tmp_path / "base", {"fc.weight": rnd(5, 3), "fc.bias": rnd(5)})
    ad = tmp_path / "ad"
    expect: tuple[type[Exception], str]
    if case == "dora":
        _peft(ad, GOOD, use_dora=True)
        expect = (UnsupportedAdapterError, "DoRA")
    elif case == "loha":
        _peft(ad, GOOD, peft_type="LOHA")
        expect = (UnsupportedAdapterError, "LoHa")
    elif case == "json":
        _peft(ad, GOOD)
        (ad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2,')
        expect = (AdapterError, "adapter_config.json: not valid JSON")
    elif case == "no_r":
        _peft(ad, GOOD, r=None)
        expect = (AdapterError, "'r' must be a positive number")
    elif case == "rank":
        _peft(ad, GOOD, r=3)
        expect = (ShapeMismatchError, "config gives rank 3 but the stored factors have rank 2")
    elif case == "lora_bias":
        _peft(ad, {**GOOD, "base_model.model.fc.lora_B.bias": torch.ones(5)})
        expect = (UnsupportedAdapterError, "lora_bias")
    elif case == "pissa":
        _peft(ad, GOOD, init_lora_weights="pissa_niter_4")
        expect = (UnsupportedAdapterError, "changes the base weights")
    elif case == "lycoris":
        ad = tmp_path / "loha.safetensors"
        save_file(
            {"lora_unet_fc.hada_w1_a": torch.ones(2, 2), "lora_unet_fc.hada_w1_b": torch.ones(2, 3)}, str(ad)
        )
        expect = (UnsupportedAdapterError, "LoHa")
    elif case == "target":
        _peft(
            ad,
            {
                "base_model.model.attn.lora_A.weight": torch.ones(2, 3),
                "base_model.model.attn.lora_B.weight": torch.ones(5, 2),
            },
        )
        expect = (MissingTensorError, "targets 'attn', but the base has no tensor 'attn.weight'")
    elif case == "shape":
        _peft(
            ad,
            {
                "base_model.model.fc.lora_A.weight": torch.ones(2, 4),
                "base_model.model.fc.lora_B.weight": torch.ones(5, 2),
            },
        )
        expect = (
            ShapeMismatchError,
            "ΔW of shape \\[5, 4\\], but the base tensor 'fc.weight' has shape \\[5, 3\\]",
        )
    elif case == "pickle":
        ad.mkdir()
        (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
        torch.save(GOOD, ad / "adapter_model.bin")
        expect = (PickleRefusedError, "pickle adapter refused")
    else:
        _peft(ad, {"base_model.model.fc.lora_A.weight": torch.ones(2, 3)})
        expect = (AdapterError, "has no partner")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(expect[0], match=expect[1]):
        FoldedCheckpoint(open_checkpoint(base), [read_adapter(ad)])
    r = CliRunner().invoke(main, ["adapter", "fold", str(base), str(ad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["adapter", "merge", str(ad), str(ad), "-o", str(tmp_path / "m")])
    if case not in ("target", "shape"):  # these two are only wrong against the base
        assert r.exit_code == 2, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before + (["m"] if (tmp_path / "m").exists() else [])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.partial-*"))


def test_merge_errors(tmp_path: Path) -> None:
    a = _peft(tmp_path / "a", GOOD)
    b = _peft(
        tmp_path / "b",
        {
            "base_model.model.fc.lora_A.weight": torch.ones(3, 3),
            "base_model.model.fc.lora_B.weight": torch.ones(5, 3),
        },
        r=3,
    )
    with pytest.raises(ShapeMismatchError, match="equal ranks"):
        merge_adapters([a, b], tmp_path / "out", method="linear")
    c = _peft(tmp_path / "c", {**GOOD, "base_model.model.head.weight": torch.ones(2, 5)})
    with pytest.raises(AdapterError, match="modules_to_save tensor 'head.weight' is in two adapters"):
        merge_adapters([c, c], tmp_path / "out", method="cat")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.partial-*"))
    merge_adapters([a, b], tmp_path / "out", method="svd", rank=2)
    with pytest.raises(Exception, match="already exists"):
        merge_adapters([a, b], tmp_path / "out", method="svd", rank=2)


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------
def test_extract_full_rank_reproduces_the_fine_tune(tmp_path: Path) -> None:
    base_t = {
        "model.embed_tokens.weight": rnd(20, 6),
        "l1.weight": rnd(8, 6),
        "l1.bias": rnd(8),
        "l2.weight": rnd(3, 8),
        "norm.weight": torch.ones(8),
    }
    ft_t = {k: v.clone() for k, v in base_t.items()}
    ft_t["model.embed_tokens.weight"] += 0.1 * rnd(20, 6)
    ft_t["l1.weight"] += 0.1 * rnd(8, 6)
    ft_t["l2.weight"] += 0.1 * rnd(3, 1) @ rnd(1, 8)  # a rank-1 change
    ft_t["norm.weight"] += 0.01
    base, ft = _base(tmp_path / "base", base_t), _base(tmp_path / "ft", ft_t)
    rep = extract_adapter(base, ft, tmp_path / "full", rank=8)
    assert {t.module for t in rep.targets} == {"model.embed_tokens", "l1", "l2"}
    assert [s["tensor"] for s in rep.skipped] == ["norm.weight"]  # changed, not capturable: reported
    f = FoldedCheckpoint(open_checkpoint(base), [read_adapter(tmp_path / "full")])
    for k in ("model.embed_tokens.weight", "l1.weight", "l2.weight"):
        torch.testing.assert_close(f[k], ft_t[k], rtol=1e-5, atol=1e-6)
    assert read_adapter(tmp_path / "full").targets["model.embed_tokens"].layout == "embedding"
    # rank 1: l2 is still exact, l1 keeps σ1² / Σσ² of its change
    rep1 = extract_adapter(base, ft, tmp_path / "r1", rank=1)
    e = {t.module: t for t in rep1.targets}
    assert e["l2"].energy == pytest.approx(1.0, abs=1e-9)
    s = torch.linalg.svdvals((ft_t["l1.weight"] - base_t["l1.weight"]).double())
    assert e["l1"].energy == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-6)
    meta = json.loads((tmp_path / "r1" / "weightsmith_adapter.json").read_text())
    assert meta["operation"] == "extract" and len(meta["targets"]) == 3


def test_extract_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    base = _base(tmp_path / "base", {k: v.contiguous() for k, v in net.state_dict().items()})
    ft_sd = {
        k: v + 0.05 * torch.randn_like(v) if k.endswith("weight") else v for k, v in net.state_dict().items()
    }
    ft = _base(tmp_path / "ft", ft_sd)
    extract_adapter(base, ft, tmp_path / "ad", rank=6)
    pm = peft.PeftModel.from_pretrained(net, str(tmp_path / "ad")).eval()
    ft_net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ft_net.load_state_dict(ft_sd)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ft_net(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_inspect_merge_extract_check(tmp_path: Path) -> None:
    from merge.lora.orthogonal import OrthogonalSpec

    base = _base(tmp_path / "base", {"fc.weight": rnd(8, 6)})
    ads = []
    for k in range(2):  # two orthogonal-adaptation adapters (disjoint slots of one basis, frozen A)
        A = OrthogonalSpec(seed=1, concept=k, rank=2).frozen_factor("fc", 8, 6)
        ads.append(
            _peft(
                tmp_path / f"c{k}",
                {"base_model.model.fc.lora_A.weight": A, "base_model.model.fc.lora_B.weight": rnd(8, 2)},
                lora_alpha=2,
            )
        )
    run = CliRunner().invoke
    r = run(main, ["adapter", "inspect", str(ads[0]), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "peft" and info["targets"][0] == {
        "module": "fc",
        "layout": "linear",
        "rank": 2,
        "scale": 1.0,
        "delta_shape": [8, 6],
    }
    r = run(main, ["adapter", "check", str(ads[0]), str(ads[1]), "--json"])
    assert r.exit_code == 0, r.output
    assert abs(json.loads(r.stdout)["max_abs_cosine"]) < 1e-6
    assert residual_cosines(ads)["pairs"][0]["shared_targets"] == 1
    r = run(
        main, ["adapter", "merge", *map(str, ads), "-o", str(tmp_path / "sum"), "--method", "cat", "--json"]
    )
    assert r.exit_code == 0, r.output
    r = run(main, ["adapter", "fold", str(base), str(tmp_path / "sum"), "-o", str(tmp_path / "folded")])
    assert r.exit_code == 0 and "folded 1 adapter(s)" in r.output, r.output
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))["fc.weight"]
    r = run(
        main,
        [
            "adapter",
            "extract",
            str(base),
            str(tmp_path / "folded"),
            "-o",
            str(tmp_path / "ex"),
            "--rank",
            "4",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["targets"][0]["energy"] == pytest.approx(1.0)  # the sum has rank 4
    back = FoldedCheckpoint(open_checkpoint(base), [read_adapter(tmp_path / "ex")])["fc.weight"]
    torch.testing.assert_close(back, folded, rtol=1e-5, atol=1e-5)
    r = run(
        main, ["adapter", "fold", str(base), str(ads[0]), "-w", "1", "-w", "2", "-o", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "1 adapters but 2 --weight values" in r.output


# ---------------------------------------------------------------------------------------------
# Hub references: org/base+org/lora@rev
# ---------------------------------------------------------------------------------------------
pytest_plugins = ["testkit.hub_server"]


def test_hub_base_plus_hub_adapter(hub_server, tmp_path: Path) -> None:
    from tests.conftest import llama_like

    base = llama_like(0)
    hub_server.publish_model("org/base", base, tmp_path / "src-base")
    q = "model.layers.1.self_attn.q_proj"
    A, B = rnd(4, 16), rnd(16, 4)
    ad = _peft(tmp_path / "src-lora", {f"base_model.model.{q}.lora_A.weight": A,
                                       f"base_model.model.{q}.lora_B.weight": B}, r=4, lora_alpha=8)
    hub_server.create_repo("org/lora")
    hub_server.upload_folder("org/lora", ad)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": "org/base+org/lora@main"}]}))
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--json", "--endpoint",
                                  hub_server.url, "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["models"][0]
    assert rec["repo_id"] == "org/base" and len(rec["adapters"][0]["commit"]) == 40
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(got[f"{q}.weight"], base[f"{q}.weight"] + 2.0 * B @ A)
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_the_randomized_truncated_svd_agrees_with_the_exact_one_and_is_repeatable() -> None:
    """Low rank + noise (a fine-tune's delta): the randomized factors reconstruct as well as the exact
    ones (within 1 % of the exact relative error), the reported error is the measured one, and two runs
    give the same bytes (a seeded sketch)."""
    from merge.lora.factors import truncated_svd

    g = torch.Generator().manual_seed(0)
    d = torch.randn(1024, 8, generator=g) @ torch.randn(8, 512, generator=g) * 0.1
    d += 0.002 * torch.randn(1024, 512, generator=g)
    exact = truncated_svd(d, 8, exact=True)
    fast = truncated_svd(d, 8)  # 512 x 1024 elements >= 2^18 and 8 <= 512 / 8: randomized
    again = truncated_svd(d, 8)
    assert fast.sigma.numel() == 18 and exact.sigma.numel() == 512  # 8 + 10 oversampled vs all
    measured = float((d - fast.factors.B @ fast.factors.A).norm() / d.norm())
    assert fast.rel_error == pytest.approx(measured, rel=1e-4)
    assert fast.rel_error <= exact.rel_error * 1.01
    assert torch.equal(fast.factors.A, again.factors.A) and torch.equal(fast.factors.B, again.factors.B)
