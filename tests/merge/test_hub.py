"""Hub references: resolve with the real huggingface_hub client against a local Hub server.

Covers parsing, download by branch / tag / commit (only the files a merge needs), cache reuse
(no second download), offline mode, error mapping (one line naming repo and revision), push
with the token checked by the server, and the model card read back with ``huggingface_hub``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from merge.card import pin_recipe, render_model_card
from merge.checkpoint import ResolvedModel, open_checkpoint
from merge.errors import (
    CheckpointError,
    HubAccessError,
    HubUnavailableError,
    ModelNotFoundError,
    WeightsmithError,
)
from merge.hub import HubResolver, parse_hub_ref, push_to_hub
from merge.methods import get_method
from merge.recipe import load_recipe
from tests.conftest import llama_like, write_checkpoint

if TYPE_CHECKING:
    from testkit.hub_server import HubServer

pytest_plugins = ["testkit.hub_server"]

EXTRA = {  # what a typical Hub model repo holds besides the weights
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 128}',
    "generation_config.json": '{"do_sample": false}',
    "README.md": "# a model\n",
    "pytorch_model.bin": b"\x80\x02not really a pickle",
    "training_args.bin": b"\x80\x02nor this",
    "onnx/model.onnx": b"onnx bytes",
    "onnx/config.json": "{}",
}
NEEDED = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
}


def resolver(server: HubServer, cache: Path, **kw) -> HubResolver:
    return HubResolver(endpoint=server.url, cache_dir=cache, progress=False, **kw)


def tensors_equal(path: Path, sd: dict[str, torch.Tensor]) -> bool:
    ckpt = open_checkpoint(path)
    return set(ckpt.keys()) == set(sd) and all(torch.equal(ckpt[k], v) for k, v in sd.items())


# -- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("org/name", ("org/name", None)),
        ("org/name@main", ("org/name", "main")),
        ("org/name@v1.0", ("org/name", "v1.0")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        ("hf://org/name@" + "a" * 40, ("org/name", "a" * 40)),
        ("hf://org/name", ("org/name", None)),
        ("hf://gpt2", ("gpt2", None)),
        ("Org-1/Name_2.5", ("Org-1/Name_2.5", None)),
        ("/abs/path", None),
        ("./org/name", None),
        ("../org/name", None),
        ("~/models/x", None),
        ("gpt2", None),  # a bare word is a relative path unless written hf://gpt2
        ("a/b/c", None),
        ("org/model.safetensors", None),
        ("org/recipe.yaml", None),
        ("org/na me", None),
        ("org/-name", None),
        ("org/na--me", None),
        ("org/name@", None),
        ("C:\\models\\x", None),
        ("", None),
    ],
)
def test_parse_hub_ref(ref: str, expected: tuple[str, str | None] | None) -> None:
    assert parse_hub_ref(ref) == expected


# -- downloading ------------------------------------------------------------------------------------


def test_branch_download_fetches_only_what_a_merge_needs(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path
) -> None:
    sd = llama_like(1)
    sha = hub_server.publish_model("org/a", sd, tmp_path / "src", extra=EXTRA)
    model = resolver(hub_server, hf_cache)("org/a")

    assert (model.repo_id, model.revision, model.commit, model.ref) == ("org/a", "main", sha, "org/a")
    assert model.path == hf_cache / "models--org--a" / "snapshots" / sha
    assert set(hub_server.downloaded_files()) == NEEDED  # no .bin, no onnx/, no README
    assert {p.name for p in model.path.iterdir()} == NEEDED
    assert tensors_equal(model.path, sd)
    assert (model.path / "tokenizer.json").read_text() == EXTRA["tokenizer.json"]


def test_sharded_repo_fetches_the_index_and_its_shards_only(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path
) -> None:
    sd = llama_like(2)
    hub_server.publish_model(
        "org/sharded",
        sd,
        tmp_path / "src",
        shards=3,
        extra={"consolidated.safetensors": b"a duplicate of the shards, never needed"},
    )
    model = resolver(hub_server, hf_cache)("org/sharded")
    got = set(hub_server.downloaded_files())
    assert got == {"model.safetensors.index.json", "config.json"} | {
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    }
    index = json.loads((model.path / "model.safetensors.index.json").read_text())
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded |= load_file(model.path / shard)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_open_checkpoint_reads_a_sharded_hub_snapshot(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path
) -> None:
    sd = llama_like(2)
    hub_server.publish_model("org/sharded", sd, tmp_path / "src", shards=2)
    assert tensors_equal(resolver(hub_server, hf_cache)("org/sharded").path, sd)


def test_commit_tag_and_branch_pin_different_contents(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path
) -> None:
    v1, v2 = llama_like(1), llama_like(2)
    sha1 = hub_server.publish_model("org/a", v1, tmp_path / "v1")
    hub_server.tag("org/a", "v1.0", sha1)
    sha2 = hub_server.publish_model("org/a", v2, tmp_path / "v2")
    assert sha1 != sha2
    r = resolver(hub_server, hf_cache)

    by_commit = r(f"org/a@{sha1}")
    assert by_commit.commit == sha1 and tensors_equal(by_commit.path, v1)
    # a commit needs no revision lookup: the client goes straight to the tree listing
    assert not any(q.path.startswith("/api/models/org/a/revision") for q in hub_server.requests)

    assert r("org/a@v1.0").commit == sha1
    latest = r("org/a")
    assert latest.commit == sha2 and tensors_equal(latest.path, v2)
    assert r(f"hf://org/a@{sha2}").path == latest.path
    # the resolver's own default revision applies to references without one
    assert resolver(hub_server, hf_cache, revision="v1.0")("org/a").commit == sha1
    assert [m.commit for m in r.resolved] == [sha1, sha1, sha2, sha2]


def test_second_run_reuses_the_cache(hub_server: HubServer, hf_cache: Path, tmp_path: Path) -> None:
    sha = hub_server.publish_model("org/a", llama_like(1), tmp_path / "src", extra=EXTRA)
    first = resolver(hub_server, hf_cache)("org/a")
    assert len(hub_server.downloads()) == len(NEEDED)

    hub_server.clear_log()
    again = resolver(hub_server, hf_cache)("org/a")
    assert again == first
    assert hub_server.downloads() == []  # no file downloaded again
    # a branch still has to be resolved to its commit: exactly one request, nothing else
    assert [(q.method, q.path) for q in hub_server.requests] == [("GET", "/api/models/org/a/revision/main")]

    hub_server.clear_log()
    assert resolver(hub_server, hf_cache)(f"org/a@{sha}").path == first.path
    assert hub_server.requests == []  # pinned commit + warm cache: no request at all


def test_offline_mode_uses_the_cache_only(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = llama_like(3)
    sha = hub_server.publish_model("org/a", sd, tmp_path / "a")
    hub_server.publish_model("org/never-downloaded", llama_like(4), tmp_path / "b")
    online = resolver(hub_server, hf_cache)("org/a")
    hub_server.clear_log()

    for ref in ("org/a", "org/a@main", f"org/a@{sha}"):
        m = resolver(hub_server, hf_cache, offline=True)(ref)
        assert (m.path, m.commit) == (online.path, sha)
    with pytest.raises(HubUnavailableError, match=r"'org/never-downloaded' \(revision 'main'\).*offline"):
        resolver(hub_server, hf_cache, offline=True)("org/never-downloaded")
    with pytest.raises(HubUnavailableError, match=r"'org/a' \(revision 'dev'\)"):
        resolver(hub_server, hf_cache, offline=True)("org/a@dev")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment variable works like offline=True
    assert resolver(hub_server, hf_cache)("org/a").commit == sha
    assert hub_server.requests == []
    assert tensors_equal(online.path, sd)


def test_download_progress_goes_to_stderr_unless_silenced(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    hub_server.publish_model("org/a", llama_like(1), tmp_path / "a")
    HubResolver(endpoint=hub_server.url, cache_dir=hf_cache / "quiet", progress=False)("org/a")
    assert capfd.readouterr().err == ""
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set in this environment")
    HubResolver(endpoint=hub_server.url, cache_dir=hf_cache / "loud", progress=True)("org/a")
    err = capfd.readouterr().err
    assert "Fetching 2 files" in err and "100%" in err  # config.json + model.safetensors


def test_weights_only_repo_online_then_offline(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, tmp_path / "w.safetensors")
    hub_server.create_repo("org/bare")
    sha = hub_server.commit("org/bare", {"model.safetensors": tmp_path / "w.safetensors"})
    online = resolver(hub_server, hf_cache)("org/bare")
    offline = resolver(hub_server, hf_cache, offline=True)("org/bare")
    assert online == offline and online.commit == sha and tensors_equal(online.path, sd)
    # step 1 matching nothing (no index, no config) is expected: no client warning about it
    assert not [r for r in caplog.records if "No files matched" in r.getMessage()]


def test_local_path_wins_over_a_hub_id_of_the_same_spelling(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_server.publish_model("org/a", llama_like(1), tmp_path / "remote")
    local_sd = llama_like(9)
    work = tmp_path / "work"
    write_checkpoint(work / "org" / "a", local_sd)
    monkeypatch.chdir(work)
    m = resolver(hub_server, hf_cache)("org/a")
    assert (m.repo_id, m.commit, m.path) == (None, None, Path("org/a"))
    assert tensors_equal(m.path, local_sd)
    assert hub_server.requests == []
    # hf:// forces the Hub
    assert resolver(hub_server, hf_cache)("hf://org/a").repo_id == "org/a"


# -- errors -----------------------------------------------------------------------------------------


def _error(r: HubResolver, ref: str, exc: type[Exception]) -> str:
    with pytest.raises(exc) as info:
        r(ref)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line_and_name_repo_and_revision(
    hub_server: HubServer, hf_cache: Path, tmp_path: Path
) -> None:
    hub_server.publish_model("org/a", llama_like(1), tmp_path / "a")
    hub_server.publish_model("org/gated", llama_like(2), tmp_path / "g", gated=True, granted={"alice"})
    hub_server.publish_model("alice/private", llama_like(3), tmp_path / "p", private=True, owner="alice")
    hub_server.create_repo("org/pickles")
    hub_server.commit("org/pickles", {"pytorch_model.bin": b"\x80\x02", "config.json": "{}"})
    hub_server.publish_model("org/broken", llama_like(4), tmp_path / "b", shards=2)
    hub_server.commit("org/broken", {}, delete=("model-00002-of-00002.safetensors",))
    anon = resolver(hub_server, hf_cache)

    msg = _error(anon, "org/nope", ModelNotFoundError)
    assert "'org/nope' (revision 'main')" in msg and "no such repo" in msg
    msg = _error(anon, "org/a@nope", ModelNotFoundError)
    assert "'org/a' (revision 'nope')" in msg and "no revision 'nope'" in msg
    assert "'org/a' (revision '" + "0" * 40 + "')" in _error(anon, "org/a@" + "0" * 40, ModelNotFoundError)

    msg = _error(anon, "org/gated", HubAccessError)
    assert "'org/gated' (revision 'main') is gated" in msg and "no token given" in msg
    bob = resolver(hub_server, hf_cache, token="hf_read_bob")
    assert "the token was refused" in _error(bob, "org/gated@main", HubAccessError)
    assert resolver(hub_server, hf_cache, token="hf_write_alice")("org/gated").repo_id == "org/gated"

    assert not isinstance(_error(anon, "alice/private", ModelNotFoundError), HubAccessError)
    assert "token has no access" in _error(bob, "alice/private", ModelNotFoundError)
    assert resolver(hub_server, hf_cache, token="hf_write_alice")("alice/private").commit

    msg = _error(resolver(hub_server, hf_cache, token="hf_stolen"), "org/a", HubAccessError)
    assert "'org/a' (revision 'main')" in msg and "401" in msg

    msg = _error(anon, "org/pickles", ModelNotFoundError)
    assert "no .safetensors weights" in msg and "pytorch_model.bin" in msg
    msg = _error(anon, "org/broken", CheckpointError)
    assert "'org/broken'" in msg and "model-00002-of-00002.safetensors" in msg

    assert "not a Hub reference" in _error(anon, "./no/such/dir", ModelNotFoundError)
    # nothing of the failed ones reached the snapshot folders
    assert not (hf_cache / "models--org--broken" / "snapshots").exists() or not any(
        (hf_cache / "models--org--broken" / "snapshots").rglob("*.safetensors")
    )


def test_unreachable_hub_without_cache(hub_server: HubServer, hf_cache: Path) -> None:
    url = hub_server.url
    hub_server.stop()  # nothing listens on that port any more
    r = HubResolver(endpoint=url, cache_dir=hf_cache, progress=False)
    msg = _error(r, "org/a@main", HubUnavailableError)
    assert "'org/a' (revision 'main')" in msg and url in msg


def test_server_error_then_a_retry_completes(hub_server: HubServer, hf_cache: Path, tmp_path: Path) -> None:
    sd = llama_like(1)
    sha = hub_server.publish_model("org/a", sd, tmp_path / "a")
    # (501: the client retries 5xx answers it deems transient, with a back-off of about 23 s)
    hub_server.fail("/resolve/", status=501, times=100)  # every file request fails
    msg = _error(resolver(hub_server, hf_cache), "org/a", HubUnavailableError)
    assert "'org/a' (revision 'main')" in msg and "501" in msg
    hub_server.faults.clear()
    hub_server.clear_log()
    m = resolver(hub_server, hf_cache)("org/a")
    assert m.commit == sha and tensors_equal(m.path, sd)


# -- push -------------------------------------------------------------------------------------------


def test_push_checks_the_token(hub_server: HubServer, tmp_path: Path, hf_cache: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    (out / "README.md").write_text("---\ntags:\n- merge\n---\n# merged\n")

    with pytest.raises(HubAccessError, match="no token given"):
        push_to_hub(out, "alice/merged", endpoint=hub_server.url)
    with pytest.raises(HubAccessError, match="'alice/merged'.*403"):
        push_to_hub(out, "alice/merged", token="hf_read_bob", endpoint=hub_server.url)
    with pytest.raises(HubAccessError):
        push_to_hub(out, "alice/merged", token="hf_stolen", endpoint=hub_server.url)
    assert "alice/merged" not in hub_server.repos
    with pytest.raises(WeightsmithError, match="expected a Hub repo id"):
        push_to_hub(out, "alice/merged@main", token="hf_write_alice", endpoint=hub_server.url)

    hub_server.clear_log()
    url = push_to_hub(out, "alice/merged", token="hf_write_alice", endpoint=hub_server.url, private=True)
    repo = hub_server.repos["alice/merged"]
    assert url == f"{hub_server.url}/alice/merged/commit/{repo.branches['main']}"
    assert repo.private
    assert {q.token for q in hub_server.requests} == {"hf_write_alice"}
    assert ("POST", "/api/models/alice/merged/commit/main") in [
        (q.method, q.path) for q in hub_server.requests
    ]
    files = hub_server.files("alice/merged")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == {
        p.name: p.read_bytes() for p in out.iterdir()
    }
    # pushing again to the existing repo adds a commit
    (out / "config.json").write_text('{"v": 2}')
    push_to_hub(out, "alice/merged", token="hf_write_alice", endpoint=hub_server.url)
    assert hub_server.files("alice/merged")["config.json"] == b'{"v": 2}'
    assert len(repo.commits) == 3  # initial .gitattributes commit + two uploads


# -- model card -------------------------------------------------------------------------------------


def test_model_card_front_matter_parses_with_huggingface_hub(tmp_path: Path) -> None:
    base = ResolvedModel("org/base@main", tmp_path, "org/base", "main", "1" * 40)
    a = ResolvedModel("hf://org/a@v2", tmp_path, "org/a", "v2", "2" * 40)
    local = ResolvedModel("./models/local", tmp_path / "local")
    recipe = load_recipe(
        {
            "merge_method": "linear",
            "base_model": "org/base@main",
            "name": "soup-7b",
            "models": [
                {"model": "hf://org/a@v2", "parameters": {"weight": 0.3}},
                {"model": "./models/local", "parameters": {"weight": 0.7}},
            ],
        }
    )
    method = get_method("linear")
    text = render_model_card(recipe.to_yaml(), method, [a, local], base)
    (tmp_path / "README.md").write_text(text)

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == ["org/base", "org/a"]  # Hub ids only, base first
    assert card.data.tags == ["merge", "weightsmith"]
    assert card.data.library_name == "transformers"
    data = card.data.to_dict()
    assert data["base_model_relation"] == "merge"
    assert data["weightsmith"]["method"] == "linear"
    assert [(m["role"], m["ref"], m.get("commit")) for m in data["weightsmith"]["models"]] == [
        ("base", "org/base@main", "1" * 40),
        ("merged", "hf://org/a@v2", "2" * 40),
        ("merged", "./models/local", None),
    ]
    assert card.text.lstrip().startswith("# soup-7b")
    assert method.url in card.text and method.paper in card.text
    assert "1" * 40 in card.text and "2" * 40 in card.text

    pinned = pin_recipe(recipe.to_yaml(), [base, a, local])
    assert pinned is not None and f"org/a@{'2' * 40}" in card.text
    rp = load_recipe(pinned)
    assert rp.base_model == f"org/base@{'1' * 40}"
    assert [m.model for m in rp.models or []] == [f"org/a@{'2' * 40}", "./models/local"]
    assert [m.parameters for m in rp.models or []] == [m.parameters for m in recipe.models or []]
    # deterministic: same inputs, same bytes
    assert render_model_card(recipe.to_yaml(), method, [a, local], base) == text
    # a card without Hub models still parses, and has no base_model
    plain = ModelCard(render_model_card(recipe.to_yaml(), method, [local], None))
    assert plain.data.base_model is None and plain.data.tags == ["merge", "weightsmith"]
    assert yaml.safe_load(text.split("---")[1])["weightsmith"]["models"][2]["ref"] == "./models/local"
    assert json.dumps(data)  # plain JSON-serialisable metadata
