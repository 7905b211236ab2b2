"""``weightsmith soup init | add | remove | build | show | greedy`` (service/cli/soup.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from merge.checkpoint import open_checkpoint
from merge.methods.soups import greedy_soup
from service.cli.main import main
from tests.conftest import llama_like, tree_digest, write_checkpoint


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def models(tmp_path: Path, n: int) -> list[Path]:
    base = llama_like(0)
    return [write_checkpoint(tmp_path / f"m{i}", llama_like(i, base=base)) for i in range(1, n + 1)]


def test_soup_lifecycle_from_the_shell(tmp_path: Path) -> None:
    ms = models(tmp_path, 3)
    soup = tmp_path / "soup"
    code, out, err = run("soup", "init", soup, ms[0], ms[1], "--weight", "1", "--weight", "2")
    assert code == 0, err
    assert "2 member(s)" in out and "m1" in out and "weight 2" in out
    code, out, _ = run("soup", "add", soup, ms[2], "--id", "third", "--json")
    assert code == 0 and json.loads(out)["members"][-1]["id"] == "third"
    code, out, _ = run("soup", "build", soup, "-o", tmp_path / "out3", "--json")
    assert code == 0 and json.loads(out)["total_weight"] == 4.0
    code, out, _ = run("soup", "remove", soup, "third")
    assert code == 0 and "removed 'third': 2 member(s) left" in out
    code, out, _ = run("soup", "build", soup, "-o", tmp_path / "out2")
    assert code == 0 and "built soup" in out
    a, b = open_checkpoint(ms[0]), open_checkpoint(ms[1])
    got = open_checkpoint(tmp_path / "out2")
    for k in got:
        assert torch.equal(got[k], ((a[k].double() + 2 * b[k].double()) / 3).float()), k
    code, out, _ = run("soup", "show", soup, "--verify")
    assert code == 0 and "[ok]" in out and "remove third" in out
    info = json.loads(run("soup", "show", soup, "--json")[1])
    assert [e["op"] for e in info["history"]] == ["init", "add", "remove"]


def test_soup_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    ms = models(tmp_path, 2)
    soup = tmp_path / "soup"
    assert run("soup", "init", soup, ms[0])[0] == 0
    digest = tree_digest(soup)
    wide = write_checkpoint(tmp_path / "wide", llama_like(5, hidden=20))
    for args, msg in [
        (("soup", "add", soup, wide), "has shape"),
        (("soup", "add", soup, tmp_path / "nothing"), "no such local path"),
        (("soup", "remove", soup, "m7"), "'m7' is not a member of the soup (members: m1)"),
        (("soup", "add", soup, ms[0]), "'m1' is already in the soup"),
        (("soup", "init", soup, ms[1]), "already exists"),
        (("soup", "build", ms[0], "-o", tmp_path / "o"), "not a soup folder"),
    ]:
        code, out, err = run(*args)
        assert code == 2, (args, out, err)
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err
    assert tree_digest(soup) == digest
    (ms[0] / "model.safetensors").write_bytes((ms[0] / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    code, out, _ = run("soup", "show", soup, "--verify")
    assert code == 2 and "has changed since it was added" in out


SCORER = """
import torch
from safetensors.torch import load_file

TARGET = load_file({target!r})

def score(sd):
    return -sum(float((sd[k].float() - TARGET[k].float()).pow(2).sum()) for k in TARGET)

not_callable = 3
"""


def test_greedy_from_the_shell_writes_the_soup_it_scored(tmp_path: Path) -> None:
    base = llama_like(0)
    paths = [
        write_checkpoint(tmp_path / f"g{i}", llama_like(i, base=base, noise=0.01 * (1 + 4 * (i == 3))))
        for i in range(1, 5)
    ]
    write_checkpoint(tmp_path / "target", base)
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text(SCORER.format(target=str(tmp_path / "target" / "model.safetensors")))
    code, out, err = run(
        "soup", "greedy", *paths, "--scorer", f"{scorer}:score", "-o", tmp_path / "out", "--json"
    )
    assert code == 0, err
    log = json.loads(out)
    assert "rejected" in err and "kept" in err  # one line per candidate on stderr
    assert log["score"] >= log["best_individual"]
    assert len(log["steps"]) == 4 and any(not s["kept"] for s in log["steps"])
    assert str(tmp_path / "g3") not in log["kept"]  # the noisy one
    saved = json.loads((tmp_path / "out" / "greedy_soup.json").read_text())
    assert saved["kept"] == log["kept"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("s", scorer)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lib = greedy_soup(paths, mod.score, names=[str(p) for p in paths])
    written = open_checkpoint(tmp_path / "out")
    assert lib.kept == log["kept"]
    for k, v in lib.state_dict.items():
        assert torch.equal(written[k], v), k
    assert (tmp_path / "out" / "weightsmith_recipe.yml").exists()
    # bad scorers, existing output
    for spec_, msg in [
        ("nomodule_xyz:score", "cannot import"),
        (f"{scorer}:missing", "has no callable 'missing'"),
        (f"{scorer}:not_callable", "has no callable"),
        ("score", "expected module:function"),
    ]:
        code, _, err = run("soup", "greedy", *paths[:2], "--scorer", spec_, "-o", tmp_path / "o2")
        assert code == 2 and msg in err, (spec_, err)
    code, _, err = run("soup", "greedy", *paths[:2], "--scorer", f"{scorer}:score", "-o", tmp_path / "out")
    assert code == 2 and "already exists" in err
