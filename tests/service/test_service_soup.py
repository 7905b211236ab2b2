"""SoupService against the real server on 127.0.0.1: living soups as resources with the library's
exactness (merge.soups.folder: same bytes as the library; remove = never added) and atomicity (a server SIGKILL
in the middle of an add leaves the soup as it was); jobs of one soup run in request order; bad input."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from merge.soups.folder import Soup
from service.client import RemoteError, state_name
from tests.support.service import (
    ServerProcess,
    files_of,
    make_models,
    tiny_state_dict,
    tree_digest,
    wait_for,
    write_model,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("soup")
    root, outside = base / "root", base / "outside"
    models = make_models(root, 4)
    write_model(root / "narrow", tiny_state_dict(7, hidden=4))
    make_models(outside, 1, prefix="secret")
    srv = ServerProcess(base / "data", [root], args=["--max-running", "2"])
    srv.start()
    client = srv.client()
    client.wait_ready()
    yield {"base": base, "root": root, "outside": outside, "models": models, "srv": srv, "client": client}
    client.close()
    srv.stop()


def _ok(c, job):
    done = c.wait(job.name, timeout=120)
    assert state_name(done.state) == "SUCCEEDED", done.error.message
    return c.job_result(done)


def test_soup_operations_equal_the_library(env: dict) -> None:
    c, root, m, base = env["client"], env["root"], env["models"], env["base"]
    res = _ok(c, c.create_soup("soups/s", [str(m[0]), {"model": str(m[1]), "weight": 2.0}], display_name="s"))
    assert res.operation == "create" and [x.id for x in res.soup.members] == ["m0", "m1"]
    _ok(c, c.add_soup_member(str(root / "soups/s"), str(m[2])))
    built = _ok(c, c.build_soup(str(root / "soups/s"), "built/s3"))
    assert built.operation == "build" and built.output_path == str(root / "built/s3")
    lib = Soup.init(base / "lib", [m[0], m[1]], weights=[1.0, 2.0], name="s")
    lib.add(m[2])
    lib.build(base / "lib-built")
    assert (
        files_of(root / "built/s3")["model.safetensors"] == files_of(base / "lib-built")["model.safetensors"]
    )
    # remove = the soup that never had the member, bit for bit
    before_add = c.get_soup(str(root / "soups/s")).history[0].soup_id
    removed = _ok(c, c.remove_soup_member(str(root / "soups/s"), "m2"))
    assert removed.soup.soup_id == before_add and [x.id for x in removed.soup.members] == ["m0", "m1"]
    _ok(c, c.build_soup(str(root / "soups/s"), "built/s2"))
    ref2 = Soup.init(base / "lib2", [m[0], m[1]], weights=[1.0, 2.0])
    ref2.build(base / "lib2-built")
    assert (
        files_of(root / "built/s2")["model.safetensors"] == files_of(base / "lib2-built")["model.safetensors"]
    )
    shown = c.get_soup(str(root / "soups/s"), verify=True)
    assert [e.op for e in shown.history] == ["init", "add", "remove"]
    assert all(x.status == "ok" for x in shown.members) and shown.display_name == "s"


def test_server_kept_soup_and_jobs_run_in_request_order(env: dict) -> None:
    c, m = env["client"], env["models"]
    created = c.create_soup("", [str(m[0])])
    ref = f"job://{created.name[5:]}"
    _ok(c, created)
    # queued back to back: accepted (same soup, one after the other), history in request order
    jobs = [c.add_soup_member(ref, str(m[i])) for i in (1, 2, 3)]
    for j in jobs:
        _ok(c, j)
    soup = c.get_soup(ref)
    assert [e.member for e in soup.history[1:]] == ["m1", "m2", "m3"] and soup.ref == ref
    assert Path(soup.path).parent == env["srv"].data_dir / "outputs"
    with pytest.raises(RemoteError) as e:
        c.remove_soup_member(ref, "m9")
    assert e.value.code == "NOT_FOUND"


def test_soup_bad_input_gets_the_right_code_and_leaves_the_soup_as_it_was(env: dict) -> None:
    c, root, outside, m = env["client"], env["root"], env["outside"], env["models"]
    _ok(c, c.create_soup("soups/bad", [str(m[0]), str(m[1])]))
    soup = str(root / "soups/bad")
    cases = [
        (
            lambda: c.add_soup_member(soup, str(outside / "secret0")),
            "PERMISSION_DENIED",
            "outside the server's roots",
        ),
        (lambda: c.add_soup_member(soup, str(m[0])), "ALREADY_EXISTS", "already a member"),
        (lambda: c.add_soup_member(soup, {"model": str(m[2]), "weight": -1.0}), "INVALID_ARGUMENT", "weight"),
        (lambda: c.add_soup_member(str(root / "m0"), str(m[2])), "NOT_FOUND", "not a soup"),
        (lambda: c.add_soup_member(str(root / "nope"), str(m[2])), "NOT_FOUND", "nope"),
        (lambda: c.remove_soup_member(soup, "m7"), "NOT_FOUND", "not a member"),
        (lambda: c.create_soup("soups/bad", [str(m[0])]), "ALREADY_EXISTS", "exists"),
        (lambda: c.create_soup(str(outside / "s"), [str(m[0])]), "PERMISSION_DENIED", "output_path"),
        (lambda: c.create_soup("soups/x", [str(m[0])], dtype="int8"), "INVALID_ARGUMENT", "dtype"),
        (lambda: c.build_soup(soup, str(m[0]), overwrite=True), "INVALID_ARGUMENT", "overlaps"),
        (lambda: c.get_soup(str(outside)), "PERMISSION_DENIED", "outside"),
    ]
    before = tree_digest(root), tree_digest(outside)
    for call, code, text in cases:
        with pytest.raises(RemoteError) as e:
            call()
        assert (e.value.code, text in e.value.message) == (code, True), e.value.message
    assert (tree_digest(root), tree_digest(outside)) == before
    # a member that does not fit fails its job; the soup is unchanged
    job = c.wait(c.add_soup_member(soup, str(root / "narrow")).name, timeout=60)
    assert state_name(job.state) == "FAILED" and "narrow" in job.error.message
    assert tree_digest(root) == before[0]


def test_sigkill_during_add_leaves_the_soup_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "root"
    m = make_models(root, 3, layers=8)
    Soup.init(root / "s", [m[0], m[1]])
    Soup(root / "s").build(tmp_path / "before")
    manifest = (root / "s" / "soup.json").read_bytes()
    srv = ServerProcess(tmp_path / "data", [root], args=["--slow-down", "0.5"]).start()
    try:
        c = srv.client()
        job = c.add_soup_member(str(root / "s"), str(m[2]))
        wait_for(lambda: c.get_job(job.name).progress.phase == "sum", 60, what="summing")
        srv.signal(signal.SIGKILL)
        srv.wait()
        c.close()
    finally:
        srv.kill()
    assert (root / "s" / "soup.json").read_bytes() == manifest  # the soup as it was
    srv = ServerProcess(tmp_path / "data", [root]).start()
    try:
        c = srv.client()
        got = c.get_job(job.name)
        assert state_name(got.state) == "INTERRUPTED"
        shown = c.get_soup(str(root / "s"), verify=True)
        assert [x.id for x in shown.members] == ["m0", "m1"] and all(x.status == "ok" for x in shown.members)
        _ok(c, c.build_soup(str(root / "s"), "after"))
        assert (
            files_of(root / "after")["model.safetensors"]
            == files_of(tmp_path / "before")["model.safetensors"]
        )
        c.retry_job(job.name)  # the add, again: now it happens (and the leftovers are cleaned)
        res = _ok(c, c.get_job(job.name))
        assert [x.id for x in res.soup.members] == ["m0", "m1", "m2"] and not res.soup.leftovers
        c.close()
    finally:
        srv.stop()


def test_cli_remote_soup(env: dict) -> None:
    import json

    from click.testing import CliRunner

    from service.cli.main import main
    from tests.support.service import TOKEN

    conn = ["--server", env["srv"].target, "--token", TOKEN]
    root, m = env["root"], env["models"]
    r = CliRunner().invoke(
        main, ["remote", "soup", "create", f"a={m[0]}", f"{m[1]}:3", "-o", "soups/cli", *conn]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["remote", "soup", "add", str(root / "soups/cli"), str(m[2]), *conn])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["remote", "soup", "show", str(root / "soups/cli"), "--json", *conn])
    shown = json.loads(r.stdout)
    assert [(x["id"], x["weight"]) for x in shown["members"]] == [("a", 1.0), ("m1", 3.0), ("m2", 1.0)]
    r = CliRunner().invoke(main, ["remote", "soup", "remove", str(root / "soups/cli"), "zz", *conn])
    assert r.exit_code == 2 and "error: NOT_FOUND" in r.output
    r = CliRunner().invoke(
        main, ["remote", "soup", "build", str(root / "soups/cli"), "-o", "built/cli", *conn]
    )
    assert r.exit_code == 0 and (root / "built/cli" / "model.safetensors").exists()
