"""One NaN/Inf policy wherever weights are read (issue 22, item 6): refused with the tensor named.

Merge (tests/merge/test_engine.py), soups (tests/merge/test_soup.py) and metanets predict/embed
(tests/metanets/test_metanets_train.py) are checked beside their other tests; lineage and adapters here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from merge.errors import NonFiniteError
from merge.lora.algebra import extract_adapter, merge_adapters
from metanets.lineage import detect_lineage
from service.cli.main import main
from tests.conftest import llama_like, write_checkpoint

BAD = "model.layers.1.mlp.up_proj.weight"


def _models(tmp_path: Path) -> dict[str, Path]:
    base = llama_like(0)
    ft = llama_like(1, base=base)
    bad = {k: v.clone() for k, v in llama_like(2, base=base).items()}
    bad[BAD][3, 2] = float("nan")
    return {n: write_checkpoint(tmp_path / n, sd) for n, sd in (("base", base), ("ft", ft), ("bad", bad))}


@pytest.mark.parametrize("who", ["child", "candidate"])
def test_lineage_refuses_nan_in_the_child_or_a_candidate(tmp_path: Path, who: str) -> None:
    m = _models(tmp_path)
    child, cands = (m["bad"], [m["base"], m["ft"]]) if who == "child" else (m["ft"], [m["base"], m["bad"]])
    with pytest.raises(NonFiniteError, match=f"bad: tensor '{BAD}' has 1 NaN/Inf value"):
        detect_lineage(str(child), [str(c) for c in cands])
    r = CliRunner().invoke(main, ["lineage", str(child), "--candidates", *map(str, cands), "-q"])
    assert r.exit_code == 2 and f"tensor '{BAD}'" in r.output and "NaN/Inf" in r.output, r.output


def test_adapters_refuse_nan_factors_naming_the_tensor(tmp_path: Path) -> None:
    m = _models(tmp_path)
    ad = Path(extract_adapter(m["base"], m["ft"], tmp_path / "ad", rank=2).out)
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(ad / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteError, match=f"tensor '{key}' has 1 NaN/Inf"):
        merge_adapters([ad, ad], tmp_path / "merged", method="cat")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(NonFiniteError, match=f"tensor '{BAD}'"):  # extract reads the weights too
        extract_adapter(m["base"], m["bad"], tmp_path / "ad2", rank=2)
    assert torch.isnan(load_file(str(m["bad"] / "model.safetensors"))[BAD]).sum() == 1  # input untouched
