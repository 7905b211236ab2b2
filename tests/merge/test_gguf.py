"""GGUF checkpoints (merge.gguf) read like safetensors: names, values, row ranges, merges, errors.

The files are made here with the ``gguf`` package's writer (testkit.gguf: a tiny random llama, converted
as llama.cpp does); transformers' own GGUF loader is the reference for names and values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("gguf")

from merge.checkpoint import open_checkpoint  # noqa: E402
from merge.errors import CheckpointError  # noqa: E402
from merge.execute import run_merge  # noqa: E402
from testkit.gguf import llama_gguf, raw_kquant_gguf, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("gguf")
    model, sd = tiny_llama(0)
    files = {q: llama_gguf(d / f"tiny-{q}.gguf", model, sd, q) for q in ("F32", "F16", "BF16", "Q8_0", "Q4_0")}
    return {"dir": d, "model": model, "state": sd, "files": files}


def test_names_and_values_are_what_transformers_loads(llama: dict) -> None:
    """Hugging Face names; Q and K rows back in Hugging Face order; F32 exactly the original."""
    from transformers import AutoModelForCausalLM

    ck = open_checkpoint(llama["files"]["F32"])
    assert set(ck) == set(llama["state"]) and ck.gguf.architecture == "llama"
    for k, v in llama["state"].items():
        assert ck.shape(k) == tuple(v.shape) and torch.equal(ck[k], v), k
    ref = AutoModelForCausalLM.from_pretrained(llama["dir"], gguf_file=llama["files"]["Q8_0"].name).state_dict()
    q8 = open_checkpoint(llama["files"]["Q8_0"])
    assert set(q8) == set(ref) and all(torch.equal(q8[k].float(), ref[k].float()) for k in ref)
    assert q8.gguf.stored_type("model.layers.0.mlp.up_proj.weight") == "Q8_0"
    assert "{{ m['content'] }}" in q8.gguf.metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_stored_types_keep_their_dtype_or_dequantize_within_the_quantization_error(llama: dict, qtype: str) -> None:
    ck = open_checkpoint(llama["files"][qtype])
    tol = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.5}[qtype]
    for k, v in llama["state"].items():
        got = ck[k]
        stored = {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)
        want_dtype = stored if v.dim() > 1 else torch.float32
        assert got.dtype == want_dtype and ck.dtype(k) == want_dtype, k
        assert (got.float() - v).abs().max() <= tol * v.abs().max(), k
        if v.dim() == 2:  # a row range is the same rows of the whole tensor (Q/K included)
            assert torch.equal(ck.rows(k, 3, 11), got[3:11]), k


def test_a_kquant_is_dequantized_as_the_package_does_row_range_by_row_range(tmp_path: Path) -> None:
    import gguf

    p = raw_kquant_gguf(tmp_path / "k.gguf", (6, 512), "Q4_K")
    ck = open_checkpoint(p)
    r = gguf.GGUFReader(p)
    ref = torch.from_numpy(gguf.quants.dequantize(r.tensors[0].data, r.tensors[0].tensor_type))
    assert ck.shape("w") == (6, 512) and torch.equal(ck["w"], ref)
    assert torch.equal(ck.rows("w", 2, 5), ref[2:5]) and torch.isfinite(ref).all()


def test_a_merge_of_gguf_inputs_equals_the_merge_of_their_dequantized_safetensors(llama: dict, tmp_path: Path) -> None:
    model = llama["model"]
    _, sd2 = tiny_llama(1)
    g1 = llama["files"]["Q8_0"]
    g2 = llama_gguf(tmp_path / "two.gguf", model, sd2, "Q8_0")
    st = []
    for i, g in enumerate((g1, g2)):
        ck = open_checkpoint(g)
        folder = tmp_path / f"st{i}"
        folder.mkdir()
        save_file({k: ck[k].contiguous() for k in ck}, folder / "model.safetensors")
        st.append(folder)
    def recipe(method: str, extra: dict, a: Path, b: Path) -> dict:
        return {"merge_method": method, "base_model": str(a), "dtype": "float32",
                "models": [{"model": str(a), "parameters": {"weight": 0.5, **extra}},
                           {"model": str(b), "parameters": {"weight": 0.5, **extra}}]}

    for method, extra in (("linear", {}), ("ties", {"density": 0.5})):
        run_merge(recipe(method, extra, g1, g2), tmp_path / f"{method}-gguf")
        run_merge(recipe(method, extra, *st), tmp_path / f"{method}-st")
        a = open_checkpoint(tmp_path / f"{method}-gguf")
        b = open_checkpoint(tmp_path / f"{method}-st")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), method


def test_gguf_and_safetensors_inputs_merge_together_and_the_output_loads(llama: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = tmp_path / "hf"
    m1, _ = tiny_llama(1)
    m1.save_pretrained(hf)  # safetensors + config.json
    rec = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(hf), "parameters": {"weight": 0.5}},
                      {"model": str(llama["files"]["F16"]), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    run_merge(rec, out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    sd_hf, sd_g = m1.state_dict(), open_checkpoint(llama["files"]["F16"])
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, 0.5 * sd_hf[k] + 0.5 * sd_g[k].float(), rtol=0, atol=1e-6)
    x = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.isfinite(merged(x).logits).all()


def test_bad_gguf_files_are_one_clear_line_and_no_output(llama: dict, tmp_path: Path) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q

    truncated = tmp_path / "cut.gguf"
    data = llama["files"]["F16"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        open_checkpoint(truncated)[next(iter(llama["state"]))]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.gguf: not a readable GGUF file"):
        open_checkpoint(garbage)
    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "llama")
    w.add_tensor("w", np.zeros((4, 8), dtype=np.float64), raw_dtype=Q.F64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="tensor 'w' is stored as F64"):
        open_checkpoint(odd)
    rec = {"merge_method": "linear", "models": [{"model": str(garbage)}, {"model": str(llama["files"]["F16"])}]}
    with pytest.raises(CheckpointError):
        run_merge(rec, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob("never*"))


def test_split_sets_and_folders(llama: dict, tmp_path: Path) -> None:
    from merge.gguf import gguf_files

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(llama["files"]["F16"].read_bytes())
    assert set(open_checkpoint(folder)) == set(llama["state"])
    parts = tmp_path / "split"
    parts.mkdir()
    (parts / "m-00001-of-00002.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="missing m-00002-of-00002.gguf"):
        gguf_files(parts / "m-00001-of-00002.gguf")
    (folder / "other.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="2 GGUF models in one folder"):
        open_checkpoint(folder)


def test_a_merge_written_as_gguf_loads_in_transformers_with_the_logits_of_the_safetensors_merge(
    llama: dict, tmp_path: Path
) -> None:
    """``weightsmith merge --out-format gguf``: the header of the GGUF input, GGUF names, Q/K interleaved again,
    Q8_0 matrices; transformers reads it back and computes the safetensors merge's logits (Q8_0's tolerance)."""
    import yaml
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from service.cli.main import main

    hf = tmp_path / "hf"
    m1, _ = tiny_llama(1)
    m1.save_pretrained(hf)
    rec = {"merge_method": "linear", "dtype": "float32", "base_model": str(llama["files"]["F16"]),
           "models": [{"model": str(hf), "parameters": {"weight": 0.5}},
                      {"model": str(llama["files"]["F16"]), "parameters": {"weight": 0.5}}]}
    rfile = tmp_path / "r.yaml"
    rfile.write_text(yaml.safe_dump(rec))
    out = tmp_path / "merged.gguf"
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(out), "--out-format", "gguf", "--out-type", "q8_0"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and not list(tmp_path.glob(".merged.gguf*"))  # no staging left behind
    g = open_checkpoint(out)
    assert g.gguf.stored_type("model.layers.0.mlp.up_proj.weight") == "Q8_0"
    assert g.gguf.stored_type("model.norm.weight") == "F32"
    assert g.gguf.metadata["tokenizer.chat_template"] == open_checkpoint(llama["files"]["F16"]).gguf.metadata[
        "tokenizer.chat_template"]
    run_merge(rec, tmp_path / "st")
    (tmp_path / "st" / "config.json").write_text((hf / "config.json").read_text())  # a GGUF base has none
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "st").eval()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        a, b = ref(x).logits, got(x).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # Q8_0
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    # a recipe without a GGUF model has no header to take: refused before any work
    rec2 = {"merge_method": "linear", "models": [{"model": str(hf)}, {"model": str(hf)}]}
    rfile.write_text(yaml.safe_dump(rec2))
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(tmp_path / "x.gguf"), "--out-format", "gguf"])
    assert r.exit_code == 2 and "none of its models is one" in r.output
    assert not (tmp_path / "x.gguf").exists()
