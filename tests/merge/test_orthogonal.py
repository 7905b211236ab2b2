"""Orthogonal adaptation (Po et al., CVPR 2024): seeded bases, slots, orthogonality, recovery, frozen factors."""

from __future__ import annotations

import pytest
import torch

from merge.lora.orthogonal import (
    OrthogonalSpec,
    apply_orthogonal_adaptation,
    certified_orthogonal,
    lora_residuals,
    orthogonal_basis,
    recover,
    residual_cosine_matrix,
    slot_overlap,
)


def test_basis_is_orthogonal_and_reproducible() -> None:
    o = orthogonal_basis(7, "layers.0.q_proj", 64, torch.float64)
    torch.testing.assert_close(o.T @ o, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(o, orthogonal_basis(7, "layers.0.q_proj", 64, torch.float64))
    assert not torch.allclose(o, orthogonal_basis(8, "layers.0.q_proj", 64, torch.float64))
    assert not torch.allclose(o, orthogonal_basis(7, "layers.1.q_proj", 64, torch.float64))


def test_basis_matches_recorded_values() -> None:
    """Same seed, same basis on any machine: values recorded once (torch's CPU generator + float64 QR)."""
    o = orthogonal_basis(0, "fc", 3, torch.float64)
    recorded = torch.tensor(RECORDED, dtype=torch.float64)
    torch.testing.assert_close(o, recorded, rtol=0, atol=1e-12)


RECORDED = [
    [-0.987084226620413, -0.1392152853078326, -0.0792706370217913],
    [0.1335448363234342, -0.4417225090214488, -0.8871566951306534],
    [-0.08849014774837356, 0.8862845645504918, -0.4546088036884198],
]


def _trained(spec: OrthogonalSpec, name: str, out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """A residual s·B·A with the spec's frozen factor and a random 'trained' one (float32)."""
    g = torch.Generator().manual_seed(seed)
    f = spec.frozen_factor(name, out_f, in_f)
    if spec.frozen == "A":
        return torch.randn(out_f, spec.rank, generator=g) @ f
    return f @ torch.randn(spec.rank, in_f, generator=g)


@pytest.mark.parametrize("side", ["A", "B"])
def test_disjoint_slots_give_orthogonal_residuals_and_exact_recovery(side: str) -> None:
    out_f, in_f, r = 48, 40, 4
    specs = [OrthogonalSpec(seed=3, concept=k, rank=r, frozen=side) for k in range(5)]
    res = [_trained(s, "blk.attn.k", out_f, in_f, 10 + i) for i, s in enumerate(specs)]
    for i in range(5):
        for j in range(i + 1, 5):
            dot = float((res[i].double() * res[j].double()).sum())
            assert abs(dot) <= 1e-5 * float(res[i].norm()) * float(res[j].norm())
    c = residual_cosine_matrix([{"k": x} for x in res])
    assert float((c - torch.eye(5, dtype=torch.float64)).abs().max()) < 1e-5
    merged = sum(res)
    for s, x in zip(specs, res, strict=True):
        back = recover(merged, s, "blk.attn.k")
        assert float((back - x).norm() / x.norm()) < 1e-5
    assert certified_orthogonal(specs)


def test_random_slots_overlap_and_are_not_certified() -> None:
    a = OrthogonalSpec(seed=1, concept="alice", rank=16, slots="uncoordinated")
    b = OrthogonalSpec(seed=1, concept="bob", rank=16, slots="uncoordinated")
    ca, cb = a.columns("fc", 64), b.columns("fc", 64)
    assert len(set(ca.tolist())) == 16 and torch.equal(ca, a.columns("fc", 64))  # private but reproducible
    assert slot_overlap(a, b, "fc", 64) == len(set(ca.tolist()) & set(cb.tolist())) / 16
    assert slot_overlap(a, a, "fc", 64) == 1.0
    assert not certified_orthogonal([a, b])
    assert not certified_orthogonal([OrthogonalSpec(1, 0, 4), OrthogonalSpec(1, 0, 4)])  # same slot twice
    assert not certified_orthogonal([OrthogonalSpec(1, 0, 4), OrthogonalSpec(2, 1, 4)])  # different seeds
    # overlapping columns make the residuals correlated: exact recovery fails
    ra, rb = _trained(a, "fc", 64, 64, 1), _trained(b, "fc", 64, 64, 2)
    if slot_overlap(a, b, "fc", 64) > 0:
        assert float((recover(ra + rb, a, "fc") - ra).norm() / ra.norm()) > 1e-3


def test_gaussian_factors_are_nearly_orthogonal_in_high_dimension() -> None:
    specs = [OrthogonalSpec(seed=0, concept=f"c{k}", rank=4, slots="gaussian") for k in range(3)]
    fs = [s.frozen_factor("fc", 8, 2048) for s in specs]  # r × in, N(0, 1/d)
    cross = float((fs[0] @ fs[1].T).abs().max())
    own = float((fs[0] @ fs[0].T).diagonal().mean())
    assert own == pytest.approx(1.0, abs=0.1) and cross < 0.15


def test_slot_errors() -> None:
    with pytest.raises(ValueError, match="at most 4 concepts"):
        OrthogonalSpec(seed=0, concept=4, rank=8).columns("fc", 32)
    with pytest.raises(ValueError, match="non-negative int"):
        OrthogonalSpec(seed=0, concept="x", rank=8)
    with pytest.raises(ValueError, match="frozen"):
        OrthogonalSpec(seed=0, concept=0, rank=8, frozen="C")  # type: ignore[arg-type]


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("side", ["A", "B"])
def test_frozen_factor_gets_no_gradient_in_a_peft_model(side: str) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(10, 16)
    with torch.no_grad():
        y0 = net(x).clone()
    pm = get_peft_model(net, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]))
    spec = OrthogonalSpec(seed=5, concept=1, rank=4, frozen=side)
    rep = apply_orthogonal_adaptation(pm, spec)
    assert sorted(rep) == ["0", "2"] and rep["0"]["columns"] == [4, 5, 6, 7]
    with torch.no_grad():
        torch.testing.assert_close(pm(x), y0)  # starts at the base model
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if f"lora_{side}" in n}
    assert frozen and all(not p.requires_grad for n, p in pm.named_parameters() if f"lora_{side}" in n)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = (pm(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = "B" if side == "A" else "A"
    for n, p in pm.named_parameters():
        if f"lora_{side}" in n:
            assert p.grad is None and torch.equal(p.detach(), frozen[n])
        if f"lora_{trained}" in n:
            assert p.grad is not None and float(p.grad.abs().max()) > 0
    # the residual lives in the concept's slot: reading it back from a sum with another concept is exact
    res = lora_residuals(pm)
    assert set(res) == {"0", "2"}
    other = OrthogonalSpec(seed=5, concept=0, rank=4, frozen=side)
    g = torch.Generator().manual_seed(9)
    for name, d in res.items():
        f = other.frozen_factor(name, d.shape[0], d.shape[1])
        d_other = (
            torch.randn(d.shape[0], 4, generator=g) @ f
            if side == "A"
            else f @ torch.randn(4, d.shape[1], generator=g)
        )
        back = recover(d + d_other, spec, name)
        assert float((back - d).norm() / d.norm()) < 1e-5
