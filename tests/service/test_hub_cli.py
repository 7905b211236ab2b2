"""End to end: ``weightsmith merge`` / ``inspect`` of models served by the local Hub server.

Merging by branch and by commit, byte-identical shards when a pinned recipe (the one the model
card prints) is merged again after the branches moved, ``--push-to-hub`` with the card, offline
runs from the cache, and errors that exit 2 with one line and leave no output behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from merge.checkpoint import open_checkpoint
from service.cli.main import main
from tests.conftest import llama_like

if TYPE_CHECKING:
    from testkit.hub_server import HubServer

pytest_plugins = ["testkit.hub_server"]


@pytest.fixture
def hub_models(hub_server: HubServer, tmp_path: Path) -> dict[str, object]:
    """org/base and org/ft on the server; returns their state dicts and commit shas."""
    base = llama_like(0)
    ft = llama_like(1, base=base)
    extra = {"tokenizer.json": '{"version": "1.0"}', "pytorch_model.bin": b"\x80\x02never fetched"}
    return {
        "base": base,
        "ft": ft,
        "base_sha": hub_server.publish_model("org/base", base, tmp_path / "src-base", extra=extra),
        "ft_sha": hub_server.publish_model("org/ft", ft, tmp_path / "src-ft", extra=extra),
    }


def recipe(tmp_path: Path, base_ref: str, ft_ref: str, name: str = "recipe.yml") -> Path:
    p = tmp_path / name
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": base_ref,
                "dtype": "float32",
                "models": [
                    {"model": base_ref, "parameters": {"weight": 0.25}},
                    {"model": ft_ref, "parameters": {"weight": 0.75}},
                ],
            },
            sort_keys=False,
        )
    )
    return p


def merge(hub_server: HubServer, cache: Path, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(
        main, ["merge", *args, "--endpoint", hub_server.url, "--cache-dir", str(cache)], env=env
    )


def expected_merge(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (0.25 * a[k] + 0.75 * b[k]) / 1.0 for k in a}


def assert_merged(out: Path, exp: dict[str, torch.Tensor]) -> None:
    ckpt = open_checkpoint(out)
    assert set(ckpt.keys()) == set(exp)
    for k, v in exp.items():
        torch.testing.assert_close(ckpt[k], v, rtol=0, atol=1e-7)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def test_merge_by_branch_writes_a_card_with_the_resolved_commits(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, hub_models: dict
) -> None:
    out = tmp_path / "out"
    r = merge(
        hub_server, hf_cache, str(recipe(tmp_path, "org/base", "org/ft@main")), "-o", str(out), "--json"
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert [(m["repo_id"], m["commit"]) for m in summary["models"]] == [
        ("org/base", hub_models["base_sha"]),
        ("org/ft", hub_models["ft_sha"]),
    ]
    assert_merged(out, expected_merge(hub_models["base"], hub_models["ft"]))
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'  # copied from the base snapshot
    assert "pytorch_model.bin" not in hub_server.downloaded_files()

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/base", "org/ft"]
    assert card.data.tags == ["merge", "weightsmith"]
    models = card.data.to_dict()["weightsmith"]["models"]
    assert [(m["role"], m["revision"], m["commit"]) for m in models] == [
        ("base", "main", hub_models["base_sha"]),
        ("merged", "main", hub_models["ft_sha"]),
    ]


def test_pinned_recipe_from_the_card_reproduces_byte_identical_shards(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, hub_models: dict
) -> None:
    first = tmp_path / "first"
    r = merge(hub_server, hf_cache, str(recipe(tmp_path, "org/base", "org/ft")), "-o", str(first))
    assert r.exit_code == 0, r.output

    # both branches move on after the first merge
    hub_server.publish_model("org/base", llama_like(7), tmp_path / "new-base")
    hub_server.publish_model("org/ft", llama_like(8), tmp_path / "new-ft")

    text = (first / "README.md").read_text()
    pinned = re.search(r"## Reproduce.*?```yaml\n(.*?)```", text, re.S)
    assert pinned is not None
    pinned_recipe = tmp_path / "pinned.yml"
    pinned_recipe.write_text(pinned.group(1))
    assert f"org/ft@{hub_models['ft_sha']}" in pinned.group(1)

    second, third = tmp_path / "second", tmp_path / "third"
    hub_server.clear_log()
    assert merge(hub_server, hf_cache, str(pinned_recipe), "-o", str(second)).exit_code == 0
    assert hub_server.requests == []  # pinned commits, warm cache: the Hub is not even asked
    # a cold cache downloads the pinned commits again, and still gives the same bytes
    r = merge(hub_server, tmp_path / "cold-cache", str(pinned_recipe), "-o", str(third))
    assert r.exit_code == 0, r.output
    assert hub_server.downloads() and not any(
        "/api/models/org/ft/revision" in q.path for q in hub_server.requests
    )

    assert shard_bytes(first) == shard_bytes(second) == shard_bytes(third) != {}
    assert (second / "README.md").read_bytes() == (third / "README.md").read_bytes()
    # the branch now gives a different merge
    moved = tmp_path / "moved"
    assert (
        merge(hub_server, hf_cache, str(recipe(tmp_path, "org/base", "org/ft")), "-o", str(moved)).exit_code
        == 0
    )
    assert shard_bytes(moved) != shard_bytes(first)


def test_merge_by_commit_ignores_later_commits(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, hub_models: dict
) -> None:
    hub_server.publish_model("org/ft", llama_like(5), tmp_path / "newer")
    out = tmp_path / "out"
    rec = recipe(tmp_path, f"hf://org/base@{hub_models['base_sha']}", f"org/ft@{hub_models['ft_sha']}")
    r = merge(hub_server, hf_cache, str(rec), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert_merged(out, expected_merge(hub_models["base"], hub_models["ft"]))
    assert not any("/revision/" in q.path for q in hub_server.requests)


def test_offline_merge_from_the_cache(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, hub_models: dict
) -> None:
    rec = str(recipe(tmp_path, "org/base", "org/ft"))
    assert merge(hub_server, hf_cache, rec, "-o", str(tmp_path / "online")).exit_code == 0
    hub_server.clear_log()
    r = merge(hub_server, hf_cache, rec, "-o", str(tmp_path / "offline"), "--offline")
    assert r.exit_code == 0, r.output
    r = merge(hub_server, hf_cache, rec, "-o", str(tmp_path / "env"), env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    assert hub_server.requests == []
    assert (
        shard_bytes(tmp_path / "online") == shard_bytes(tmp_path / "offline") == shard_bytes(tmp_path / "env")
    )

    r = merge(hub_server, tmp_path / "empty-cache", rec, "-o", str(tmp_path / "nothing"), "--offline")
    assert r.exit_code == 2 and not (tmp_path / "nothing").exists()
    assert "offline" in r.stderr and "'org/base' (revision 'main')" in r.stderr


def test_push_to_hub_uploads_the_merge_and_its_card(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, hub_models: dict
) -> None:
    out = tmp_path / "out"
    rec = str(recipe(tmp_path, "org/base", "org/ft"))
    r = merge(
        hub_server,
        hf_cache,
        rec,
        "-o",
        str(out),
        "--json",
        "--push-to-hub",
        "alice/soup",
        "--private",
        env={"HF_TOKEN": "hf_write_alice"},
    )
    assert r.exit_code == 0, r.output
    repo = hub_server.repos["alice/soup"]
    assert repo.private
    assert json.loads(r.stdout)["pushed"] == f"{hub_server.url}/alice/soup/commit/{repo.branches['main']}"
    writes = [q for q in hub_server.requests if q.method == "POST"]
    assert writes and {q.token for q in writes} == {"hf_write_alice"}
    files = hub_server.files("alice/soup")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == {
        p.name: p.read_bytes() for p in out.iterdir()
    }
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == ["org/base", "org/ft"]
    assert [m["commit"] for m in card.data.to_dict()["weightsmith"]["models"]] == [
        hub_models["base_sha"],
        hub_models["ft_sha"],
    ]

    # the pushed merge is itself a Hub model: inspect it by id
    r = CliRunner().invoke(
        main,
        [
            "inspect",
            "alice/soup",
            "--json",
            "--endpoint",
            hub_server.url,
            "--cache-dir",
            str(hf_cache),
            "--token",
            "hf_write_alice",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["totals"]["commit"] == repo.branches["main"]

    # a read-only token is refused by the server: exit 2, one line (the merge itself was written)
    r = merge(
        hub_server,
        hf_cache,
        rec,
        "-o",
        str(tmp_path / "out2"),
        "--push-to-hub",
        "alice/other",
        "--token",
        "hf_read_bob",
    )
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "alice/other" in r.stderr and "403" in r.stderr
    assert "alice/other" not in hub_server.repos


@pytest.mark.parametrize(
    "base_ref, ft_ref, needle",
    [
        ("org/base", "org/missing", "'org/missing' (revision 'main'): no such repo"),
        (
            "org/base",
            "org/ft@no-such-branch",
            "'org/ft' (revision 'no-such-branch'): the repo has no revision",
        ),
        ("org/base", "org/gated", "'org/gated' (revision 'main') is gated"),
        ("org/base", "org/nosafetensors@v1", "'org/nosafetensors' (revision 'v1'): no .safetensors weights"),
    ],
)
def test_hub_errors_exit_2_with_one_line_and_no_output(
    hub_server: HubServer,
    hf_cache: Path,
    tmp_path: Path,
    hub_models: dict,
    base_ref: str,
    ft_ref: str,
    needle: str,
) -> None:
    hub_server.publish_model("org/gated", llama_like(3), tmp_path / "g", gated=True)
    hub_server.create_repo("org/nosafetensors")
    hub_server.tag(
        "org/nosafetensors", "v1", hub_server.commit("org/nosafetensors", {"pytorch_model.bin": b"x"})
    )
    out = tmp_path / "out"
    r = merge(hub_server, hf_cache, str(recipe(tmp_path, base_ref, ft_ref)), "-o", str(out))
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert needle in r.stderr
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))


def test_inspect_a_hub_model_by_revision(hub_server: HubServer, hf_cache: Path, hub_models: dict) -> None:
    r = CliRunner().invoke(
        main,
        [
            "inspect",
            "org/ft",
            "--revision",
            hub_models["ft_sha"],
            "--json",
            "--endpoint",
            hub_server.url,
            "--cache-dir",
            str(hf_cache),
        ],
    )
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["totals"]["commit"] == hub_models["ft_sha"]
    assert info["totals"]["tensors"] == len(hub_models["ft"])


def test_a_typod_local_path_says_so_first_then_the_hub(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``models/ft-cdoe`` (a folder that does not exist next to ``models/ft-code``): the error says the
    local path is missing, names the near folder, and that the reference was also tried as a Hub id."""
    from tests.conftest import write_checkpoint

    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "models" / "ft-code", llama_like(1))
    write_checkpoint(tmp_path / "models" / "base", llama_like(0))
    recipe = tmp_path / "R.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear",
                                      "models": [{"model": "models/base"}, {"model": "models/ft-cdoe"}]}))
    r = merge(hub_server, hf_cache, str(recipe), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert line.startswith("error: model 'models/ft-cdoe': no such local path"), line
    assert "did you mean 'models/ft-code'?" in line and "also tried as a Hub id" in line
    assert line.index("no such local path") < line.index("Hub model 'models/ft-cdoe'")
    assert not (tmp_path / "out").exists()
