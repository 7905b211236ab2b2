"""Nothing lost (issue 22, item 1): --overwrite never deletes what weightsmith did not write, no command
writes over its inputs, and a crash in the middle of a replacement leaves the old or the new output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from merge.atomic import MARKER, atomic_output, check_output, recover
from merge.errors import OutputExistsError, OutputOverlapError
from service.cli.main import main
from tests.conftest import tree_digest

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, models: list[Path]) -> Path:
    p = tmp_path / "R.yml"
    p.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(m)} for m in models]}))
    return p


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my notes, not a model\n")
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# the rule, on the helper
# ---------------------------------------------------------------------------------------------


def test_atomic_output_rule(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output(out, what="test") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / MARKER).is_file() and (out / "a.txt").read_text() == "1"
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output(out, overwrite=False)
    with atomic_output(out, overwrite=True) as tmp:  # a previous output: replaced
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copy left

    user = _user_folder(tmp_path / "user")
    with pytest.raises(OutputExistsError, match="not a previous weightsmith output"):
        with atomic_output(user, overwrite=True):
            raise AssertionError("never reached")
    assert (user / "notes.txt").read_text() == "my notes, not a model\n"

    with pytest.raises(RuntimeError, match="boom"):  # an error: the previous output stays as it was
        with atomic_output(out, overwrite=True) as tmp:
            (tmp / "c.txt").write_text("3")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "user"]

    f = tmp_path / "tree.png"
    f.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        check_output(f, overwrite=False, kind="file")
    with atomic_output(f, overwrite=True, kind="file") as tmp:
        tmp.write_bytes(b"new")
    assert f.read_bytes() == b"new"
    with pytest.raises(OutputExistsError, match="not a file"):
        check_output(user, overwrite=True, kind="file")


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_output_overlapping_an_input_is_refused(tmp_path: Path, where: str) -> None:
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    out = {"is": model, "inside": model / "merged", "contains": tmp_path / "models"}[where]
    with pytest.raises(OutputOverlapError, match="'.*models/m'"):
        check_output(out, overwrite=True, inputs=["org/not-a-local-path", model])


# ---------------------------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------------------------


def test_merge_overwrite_of_a_folder_holding_its_inputs_is_refused(make_models, tmp_path: Path) -> None:
    """The case of the issue: DIR holds the recipe's models and a user's notes; nothing is touched."""
    paths = make_models(2)  # tmp_path/base, tmp_path/ft1
    _user_folder(tmp_path)
    recipe = _recipe(tmp_path, paths)
    before = _snapshot(tmp_path)
    for out in (tmp_path, paths[0], paths[1] / "sub"):
        r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(out), "--overwrite"])
        assert r.exit_code == 2, r.output
        assert "error:" in r.output and "the input" in r.output, r.output
        assert _snapshot(tmp_path) == before


def test_merge_overwrite_replaces_only_previous_outputs(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    recipe = _recipe(tmp_path, paths)
    user = _user_folder(tmp_path / "mine")
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(user), "--overwrite"])
    assert r.exit_code == 2 and "not a previous weightsmith output" in r.output, r.output
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]

    out = tmp_path / "merged"
    assert CliRunner().invoke(main, ["merge", str(recipe), "-o", str(out)]).exit_code == 0
    assert json.loads((out / MARKER).read_text())["command"] == "merge"
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_every_writer_refuses_a_user_folder_and_its_inputs(make_models, tmp_path: Path) -> None:
    """adapter extract / merge / fold, soup build, metanet train, lineage trees: same rule."""
    from merge.lora.algebra import extract_adapter, fold_adapters, merge_adapters
    from merge.plan import MergeOptions
    from merge.soups.folder import Soup

    base, ft = make_models(2)
    user = _user_folder(tmp_path / "mine")
    digests = {p: tree_digest(p) for p in (base, ft, user)}

    ad = extract_adapter(base, ft, tmp_path / "ad", rank=2)  # a real adapter to work with
    ad_path = Path(ad.out)
    digests[ad_path] = tree_digest(ad_path)
    soup = Soup.init(tmp_path / "soup", [base, ft])
    digests[soup.path] = tree_digest(soup.path)

    calls = {
        "adapter extract": lambda out: extract_adapter(base, ft, out, rank=2, overwrite=True),
        "adapter merge": lambda out: merge_adapters([ad_path, ad_path], out, method="cat", overwrite=True),
        "adapter fold": lambda out: fold_adapters(str(base), [str(ad_path)], out, options=MergeOptions(overwrite=True)),
        "soup build": lambda out: soup.build(out, overwrite=True),
    }
    for what, call in calls.items():
        with pytest.raises(OutputExistsError, match="not a previous weightsmith output"):
            call(user)
        with pytest.raises(OutputOverlapError):
            call(ad_path if what == "adapter merge" else base)
        assert {p: tree_digest(p) for p in digests} == digests, what
    # and each replaces its own previous output
    for what, call in calls.items():
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        call(out)
        call(out)
        assert (out / MARKER).is_file(), what


def test_lineage_tree_refuses_to_replace_without_overwrite(make_models, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    base, ft1, ft2 = make_models(3)
    tree = tmp_path / "tree.png"
    tree.write_bytes(b"a user's picture")
    args = ["lineage", str(ft1), "--candidates", str(base), str(ft2), "--tree", str(tree), "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--overwrite" in r.output, r.output
    assert tree.read_bytes() == b"a user's picture"
    r = CliRunner().invoke(main, [*args[:-3], "--tree", str(base), "-q"])  # a folder (an input) is no tree file
    assert r.exit_code == 2, r.output
    r = CliRunner().invoke(main, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert tree.read_bytes().startswith(b"\x89PNG")


def test_metanet_train_refuses_a_user_folder(tmp_path: Path) -> None:
    from metanets.train import TrainConfig, train_metanet

    user = _user_folder(tmp_path / "mine")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    with pytest.raises(OutputExistsError, match="not a previous weightsmith output"):
        train_metanet(zoo, TrainConfig(), user, overwrite=True, progress=False)
    with pytest.raises(OutputOverlapError):
        train_metanet(zoo, TrainConfig(), zoo / "net", overwrite=True, progress=False)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# a crash in the middle of a replacement
# ---------------------------------------------------------------------------------------------

_CRASH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import merge.atomic as atomic

    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "no-exchange":  # a file system without renameat2(RENAME_EXCHANGE): two renames
        atomic._exchange = lambda a, b: False
        real = os.rename
        calls = []

        def rename(a, b):
            real(a, b)
            calls.append(a)
            if len(calls) == 1:  # the old output is aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)

        atomic.os.rename = rename
    else:  # exchanged, the old output (now under the temporary name) not yet removed
        atomic._remove = lambda p: os.kill(os.getpid(), signal.SIGKILL)
    with atomic.atomic_output(out, overwrite=True) as tmp:
        (tmp / "v").write_text("new")
    """
)


@pytest.mark.parametrize("mode", ["exchange", "no-exchange"])
def test_a_crash_mid_replacement_leaves_the_old_or_the_new_output(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        (tmp / "v").write_text("old")
    p = subprocess.run([sys.executable, "-c", _CRASH, str(out), mode], cwd=REPO, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    if mode == "exchange":
        assert (out / "v").read_text() == "new"
    recover(out)  # what the next run (or the service at start-up) does
    assert (out / "v").read_text() == ("new" if mode == "exchange" else "old")
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_file_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    """Internal files (manifests, job results, training states) are written beside and renamed once."""
    from merge.atomic import replace_file

    f = tmp_path / "sub" / "state.json"
    replace_file(f, lambda tmp: tmp.write_text("old"))
    assert f.read_text() == "old"

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_file(f, fail)
    assert f.read_text() == "old" and sorted(p.name for p in f.parent.iterdir()) == ["state.json"]
    replace_file(f, lambda tmp: tmp.write_text("new"))
    assert f.read_text() == "new" and sorted(p.name for p in f.parent.iterdir()) == ["state.json"]
