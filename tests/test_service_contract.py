"""The gRPC contract and the service's pure parts: stubs in sync, buf lint, path confinement, auth."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from merge.errors import ModelNotFoundError
from service.jobs import ServiceError, cleanup_partial_outputs, parse_recipe_text
from service.paths import HubDisabledError, InvalidPathError, PathNotAllowedError, RefResolver, Roots
from tests.service_helpers import REPO, make_models


def _buf() -> str | None:
    cand = Path(sys.executable).parent / "buf"
    return str(cand) if cand.exists() else shutil.which("buf")


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    """Regenerating the stubs (offline, grpcio-tools' bundled protoc) changes nothing."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "gen"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_proto.sh"), str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    committed = REPO / "service" / "_proto"
    new = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    old = sorted(
        str(p.relative_to(committed))
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert new == old
    _, mismatch, errors = filecmp.cmpfiles(out, committed, new, shallow=False)
    assert mismatch == [] and errors == [], f"stale stubs: {mismatch or errors}; run scripts/gen_proto.sh"


def test_stubs_import_as_a_package_with_proto_file_names() -> None:
    from service._proto.weightsmith.v1 import checkpoint_service_pb2, merge_service_pb2

    assert merge_service_pb2.DESCRIPTOR.name == "weightsmith/v1/merge_service.proto"
    assert merge_service_pb2.DESCRIPTOR.package == "weightsmith.v1"
    assert set(merge_service_pb2.DESCRIPTOR.services_by_name) == {"MergeService"}
    assert set(checkpoint_service_pb2.DESCRIPTOR.services_by_name) == {"CheckpointService"}
    rpcs = {m.name for m in merge_service_pb2.DESCRIPTOR.services_by_name["MergeService"].methods}
    assert {
        "CreateMergeJob",
        "GetMergeJob",
        "WatchMergeJob",
        "CancelMergeJob",
        "ListMergeJobs",
        "ListMethods",
    } <= rpcs
    watch = merge_service_pb2.DESCRIPTOR.services_by_name["MergeService"].methods_by_name["WatchMergeJob"]
    assert watch.server_streaming and not watch.client_streaming


def test_buf_lint_is_clean() -> None:
    buf = _buf()
    if buf is None:
        pytest.skip("buf (PyPI buf-bin) not installed")
    r = subprocess.run([buf, "lint"], cwd=REPO / "proto", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_buf_breaking_against_main() -> None:
    """No wire-breaking change versus the proto on branch main (skipped where main has none)."""
    buf = _buf()
    if buf is None:
        pytest.skip("buf (PyPI buf-bin) not installed")
    has = subprocess.run(["git", "cat-file", "-e", "main:proto/buf.yaml"], cwd=REPO, capture_output=True)
    if has.returncode != 0:
        pytest.skip("branch main has no proto/buf.yaml yet")
    r = subprocess.run(
        [buf, "breaking", "--against", "../.git#branch=main,subdir=proto"],
        cwd=REPO / "proto",
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# -- path confinement ----------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    make_models(root, 2)
    make_models(outside, 1, prefix="secret")
    (root / "link_out").symlink_to(outside / "secret0")
    (root / "inner_link").symlink_to(root / "m1")
    evil = root / "evil"
    evil.mkdir()
    (evil / "model.safetensors").symlink_to(outside / "secret0" / "model.safetensors")
    return {"root": root, "outside": outside, "evil": evil}


def test_inputs_are_confined_to_roots(layout: dict[str, Path]) -> None:
    root, outside = layout["root"], layout["outside"]
    roots = Roots([root])
    assert roots.resolve_input("m0") == (root / "m0").resolve()
    assert roots.resolve_input(str(root / "m1")) == (root / "m1").resolve()
    assert roots.resolve_input("inner_link") == (root / "m1").resolve()  # a symlink inside the root is fine
    with pytest.raises(InvalidPathError, match=r"'\.\.'"):
        roots.resolve_input("m0/../m1")
    with pytest.raises(InvalidPathError, match=r"'\.\.'"):
        roots.resolve_input(f"{root}/../outside/secret0")
    with pytest.raises(PathNotAllowedError, match="outside the server's roots"):
        roots.resolve_input(str(outside / "secret0"))
    with pytest.raises(PathNotAllowedError, match="symlink"):
        roots.resolve_input("link_out")
    with pytest.raises(PathNotAllowedError, match="evil/model.safetensors is a symlink"):
        roots.resolve_input("evil")
    with pytest.raises(PathNotAllowedError):  # existence outside the roots is not revealed
        roots.resolve_input(str(outside / "does-not-exist"))
    with pytest.raises(ModelNotFoundError):
        roots.resolve_input("nope")
    with pytest.raises(InvalidPathError, match="NUL"):
        roots.resolve_input("m0\x00")


def test_outputs_are_confined_and_never_a_root_or_symlink(layout: dict[str, Path]) -> None:
    root, outside = layout["root"], layout["outside"]
    roots = Roots([root])
    assert roots.resolve_output("new/out") == root.resolve() / "new" / "out"
    with pytest.raises(PathNotAllowedError):
        roots.resolve_output(str(outside / "out"))
    with pytest.raises(PathNotAllowedError):
        roots.resolve_output("link_out/sub")  # parent is a symlink leaving the root
    with pytest.raises(PathNotAllowedError, match="symlink"):
        roots.resolve_output("inner_link")
    with pytest.raises(InvalidPathError, match="root itself"):
        roots.resolve_output(str(root))
    with pytest.raises(InvalidPathError, match=r"'\.\.'"):
        roots.resolve_output("../x")


def test_reference_kinds(layout: dict[str, Path], tmp_path: Path) -> None:
    root = layout["root"]
    uploads = tmp_path / "uploads"
    (uploads / ("a" * 32)).mkdir(parents=True)
    r = RefResolver(
        Roots([root], [uploads]), uploads, job_output=lambda jid: root / "m1" if jid == "b" * 32 else None
    )
    assert r.kind("m0") == "path" and r.kind("org/model") == "hub" and r.kind("upload://x") == "upload"
    assert r("upload://" + "a" * 32).path == uploads / ("a" * 32)
    assert r("job://" + "b" * 32).path == (root / "m1").resolve()
    with pytest.raises(ModelNotFoundError):
        r("job://" + "c" * 32)
    with pytest.raises(InvalidPathError):
        r("upload://../../etc")
    with pytest.raises(HubDisabledError, match="Hub references are disabled"):
        r("org/model")


def test_recipe_text_refuses_aliases_and_non_mappings() -> None:
    assert parse_recipe_text("merge_method: linear\nmodels: [{model: a}]\n")["merge_method"] == "linear"
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    with pytest.raises(ServiceError, match="aliases"):
        parse_recipe_text(bomb)
    with pytest.raises(ServiceError, match="mapping"):
        parse_recipe_text("- just\n- a list\n")
    with pytest.raises(ServiceError, match="not valid YAML"):
        parse_recipe_text("a: [unclosed\n")
    # a bare file name is YAML text here, never a path the server would read
    with pytest.raises(ServiceError, match="mapping"):
        parse_recipe_text("/etc/passwd.yaml")


def test_cleanup_removes_partials_and_restores_a_moved_aside_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "out.partial-abc").mkdir()
    (tmp_path / "out.partial-abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.old-123").mkdir()
    (tmp_path / ".out.old-123" / "model.safetensors").write_bytes(b"previous")
    cleanup_partial_outputs(out)
    assert not (tmp_path / "out.partial-abc").exists()
    assert (out / "model.safetensors").read_bytes() == b"previous"  # the writer died between the renames
    (tmp_path / ".out.old-456").mkdir()
    cleanup_partial_outputs(out)
    assert not (tmp_path / ".out.old-456").exists() and out.exists()


def test_tokens() -> None:
    from service.auth import BearerTokenInterceptor, load_tokens

    with pytest.raises(ValueError):
        load_tokens(["short"])
    icpt = BearerTokenInterceptor(load_tokens(["a-long-token-1", "a-long-token-2"]))
    assert icpt.check([("authorization", "Bearer a-long-token-2")]) is None
    assert icpt.check([("authorization", "bearer a-long-token-1")]) is None
    assert icpt.check([("authorization", "Bearer a-long-token-3")]) == "invalid bearer token"
    assert "missing" in icpt.check([("x-other", "1")])
    assert "missing" in icpt.check([("authorization", "Basic a-long-token-1")])
