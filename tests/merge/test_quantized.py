"""FP8 safetensors read dequantized (block and per-channel scales); other quantizations refused (merge.quantized)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge.checkpoint import open_checkpoint
from merge.errors import CheckpointError
from merge.execute import run_merge
from testkit.checkpoints import llama_like

BLOCK = (16, 8)


def _fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and one scale per BLOCK (Hugging Face fine-grained FP8: W_real = W8 · scale_inv)."""
    r, c = w.shape
    br, bc = BLOCK
    s = torch.zeros(-(-r // br), -(-c // bc))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max().clamp(min=1e-8) / 448
    full = s.repeat_interleave(br, 0)[:r].repeat_interleave(bc, 1)[:, :c]
    return (w / full).to(torch.float8_e4m3fn), s


def _expected(w8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    r, c = w8.shape
    full = s.repeat_interleave(BLOCK[0], 0)[:r].repeat_interleave(BLOCK[1], 1)[:, :c]
    return (w8.float() * full).bfloat16()


def _write_fp8(folder: Path, sd: dict[str, torch.Tensor], *, per_channel: bool = False) -> dict[str, torch.Tensor]:
    """An FP8 checkpoint of ``sd``'s matrices (block scales, or compressed-tensors' per-channel ones); returns
    what each weight dequantizes to."""
    folder.mkdir(parents=True)
    out, expected = {}, {}
    for k, v in sd.items():
        if v.dim() == 2 and v.shape[0] % 2 == 0:
            if per_channel:
                s = v.abs().amax(1, keepdim=True).clamp(min=1e-8) / 448
                w8 = (v / s).to(torch.float8_e4m3fn)
                out[k], out[k[: -len("weight")] + "weight_scale"] = w8, s
                expected[k] = (w8.float() * s).bfloat16()
            else:
                w8, s = _fp8_block(v)
                out[k], out[f"{k}_scale_inv"] = w8, s
                expected[k] = _expected(w8, s)
        else:
            out[k] = v.bfloat16()
            expected[k] = out[k]
    save_file(out, folder / "model.safetensors")
    q = {"quant_method": "compressed-tensors"} if per_channel else {
        "quant_method": "fp8", "weight_block_size": list(BLOCK)}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                    "quantization_config": q}))
    return expected


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_weights_are_served_dequantized_and_their_scales_hidden(tmp_path: Path, per_channel: bool) -> None:
    sd = llama_like(0)
    expected = _write_fp8(tmp_path / "fp8", sd, per_channel=per_channel)
    ck = open_checkpoint(tmp_path / "fp8")
    assert set(ck) == set(sd)  # no *_scale_inv / *weight_scale among the names
    for k, want in expected.items():
        assert ck.dtype(k) == torch.bfloat16 and torch.equal(ck[k], want), k
        if want.dim() == 2 and want.shape[0] > 20:
            assert torch.equal(ck.rows(k, 5, 21), want[5:21]), k  # rows that cut through scale blocks
    worst = max(float((ck[k].float() - sd[k]).abs().max() / sd[k].abs().max()) for k in sd)
    assert worst < 0.07  # e4m3 keeps 3 mantissa bits


def test_a_merge_of_fp8_inputs_equals_the_merge_of_their_dequantized_weights(tmp_path: Path) -> None:
    plain = []
    for i in range(2):
        expected = _write_fp8(tmp_path / f"fp8_{i}", llama_like(i))
        (tmp_path / f"bf16_{i}").mkdir()
        save_file(expected, tmp_path / f"bf16_{i}" / "model.safetensors")
        plain.append(tmp_path / f"bf16_{i}")

    def recipe(a: Path, b: Path) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": str(a), "dtype": "bfloat16",
                "models": [{"model": str(b), "parameters": {"weight": 0.7}}]}

    run_merge(recipe(tmp_path / "fp8_0", tmp_path / "fp8_1"), tmp_path / "from-fp8")
    run_merge(recipe(*plain), tmp_path / "from-bf16")
    a, b = open_checkpoint(tmp_path / "from-fp8"), open_checkpoint(tmp_path / "from-bf16")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "from-fp8" / "config.json").read_text())
    assert "quantization_config" not in cfg  # the merge is not quantized


def test_other_quantizations_are_refused_never_merged_as_integers(tmp_path: Path) -> None:
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    save_file({"w.weight": torch.zeros(4, 4)}, gptq / "model.safetensors")
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(CheckpointError, match="quantized with gptq"):
        open_checkpoint(gptq)
    packed = tmp_path / "packed"
    packed.mkdir()
    save_file({"w.qweight": torch.zeros(4, 4, dtype=torch.int32)}, packed / "model.safetensors")
    with pytest.raises(CheckpointError, match="'w.qweight' is a packed quantized weight"):
        open_checkpoint(packed)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"w.weight": torch.zeros(32, 16).to(torch.float8_e4m3fn), "w.weight_scale_inv": torch.ones(3, 5)},
              bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not tile"):
        open_checkpoint(bad)
