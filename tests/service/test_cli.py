"""The command line: merge / inspect / methods, exit code 2 with one readable line on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from merge.checkpoint import open_checkpoint
from service.cli.main import main


def write_recipe(tmp_path: Path, rec: dict, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(rec))
    return p


def test_merge_json_summary_and_inspect(make_models, tmp_path: Path) -> None:
    paths = make_models(3, shards=2)
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "dtype": "bfloat16",
                                     "models": [{"model": str(p)} for p in paths]})
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--json",
                                  "--shard-size", "4KB"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "linear" and summary["n_tensors"] == len(open_checkpoint(paths[0]))
    assert len(summary["shards"]) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["totals"]["tensors"] == summary["n_tensors"]
    assert info["totals"]["bytes"] == summary["bytes_written"]
    assert {t["dtype"] for t in info["tensors"]} == {"bfloat16"}
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert "model.layers.2.mlp.down_proj.weight" in r.output and "parameters" in r.output


def test_dry_run_writes_nothing(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]})
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dry_run"] is True
    assert not (tmp_path / "out").exists()


def test_methods_lists_registry() -> None:
    r = CliRunner().invoke(main, ["methods", "--json"])
    assert r.exit_code == 0
    names = {m["name"] for m in json.loads(r.stdout)}
    assert "linear" in names
    r = CliRunner().invoke(main, ["methods"])
    assert "linear" in r.output and "weight: float, per model" in r.output


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda rec, p: rec.update(merge_method="nope"), "unknown merge method 'nope'"),
        (lambda rec, p: rec["models"].append({"model": str(p / "missing")}), "missing': no such local path"),
        (lambda rec, p: rec.update(parameters={"normalize": "perhaps"}), "parameter 'normalize'"),
        (lambda rec, p: rec.update(parameters={"densty": 0.5}), "has no parameter 'densty'"),
        (lambda rec, p: rec.update(bogus=1), "bogus: unknown key"),
        (lambda rec, p: (p / "ft1" / "model.safetensors").write_bytes(b"garbage!garbage!"), "ft1"),
    ],
)
def test_errors_exit_2_with_one_line(make_models, tmp_path: Path, mutate, needle: str) -> None:
    paths = make_models(2)
    rec = {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]}
    mutate(rec, tmp_path)
    recipe = write_recipe(tmp_path, rec)
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_existing_output_needs_overwrite(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]})
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--overwrite"])
    assert r.exit_code == 0 and (tmp_path / "out" / "model.safetensors").exists()


def test_pickle_needs_flag(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torch.save({"w": torch.full((3,), float(name == "b"))}, tmp_path / name / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, {"merge_method": "linear",
                                     "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}]})
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--allow-pickle" in r.stderr
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--allow-pickle"])
    assert r.exit_code == 0, r.output
    assert torch.equal(open_checkpoint(tmp_path / "out")["w"], torch.full((3,), 0.5))


def test_console_script_runs_as_a_process(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]})
    exe = Path(sys.executable).with_name("weightsmith")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli.main"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    p = subprocess.run([*cmd, "merge", str(recipe), "-o", str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "merged" in p.stdout and (tmp_path / "out" / "model.safetensors").exists()
    p = subprocess.run([*cmd, "merge", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o2")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: recipe file not found"


def test_python_m_service_cli_imports_every_command_group() -> None:
    """``python -m service.cli.main`` runs cli.py as ``__main__``: no command module may import ``service.cli.main``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    p = subprocess.run([sys.executable, "-m", "service.cli.main", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    for group in ("merge", "moe", "soup", "adapter", "lineage", "zoo", "metanet", "remote"):
        assert f"  {group} " in p.stdout, group


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]})
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA device is available" in r.stderr
    assert not (tmp_path / "out").exists()


def test_bf16_compute_dtype_works_for_top_k_methods(make_models, tmp_path: Path) -> None:
    paths = make_models(3, dtype=torch.bfloat16)
    recipe = write_recipe(tmp_path, {"merge_method": "ties", "base_model": str(paths[0]),
                                     "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in paths[1:]]})
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--compute-dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    out = open_checkpoint(tmp_path / "out")
    assert out.dtype("lm_head.weight") == torch.bfloat16 and torch.isfinite(out["lm_head.weight"].float()).all()


def test_direct_and_buffered_output_are_byte_identical(make_models, tmp_path: Path, monkeypatch) -> None:
    from merge import blockio

    opened: list[bool] = []
    real_open = blockio._open

    def spy(path, size, direct):
        f = real_open(path, size, direct)
        opened.append(f.direct)
        return f

    monkeypatch.setattr(blockio, "_open", spy)
    paths = make_models(2, shards=2)
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]})
    outs = {}
    for flag in ("--direct-io", "--no-direct-io"):
        opened.clear()
        out = tmp_path / flag.strip("-")
        r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(out), flag, "--shard-size", "20KB"])
        assert r.exit_code == 0, r.output
        outs[flag] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
        assert len(outs[flag]) > 1
        if flag == "--no-direct-io":
            assert opened and not any(opened)
        elif _takes_o_direct(tmp_path):
            assert opened and all(opened)
    assert outs["--direct-io"] == outs["--no-direct-io"]


def _takes_o_direct(folder: Path) -> bool:
    if not getattr(os, "O_DIRECT", 0):
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)
