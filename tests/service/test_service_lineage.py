"""LineageService against the real server on 127.0.0.1: DetectLineage streams progress, the ranked
candidates and the answer, equal to metanets.lineage.detect_lineage on the same checkpoints; bad input."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from merge.symmetry import mlp_spec
from metanets.lineage import detect_lineage
from metanets.lineage.zoo import permutation_attack
from service.client import RemoteError
from tests.metanets.test_lineage import fine_tune, mlp_state
from tests.support.service import ServerProcess, tree_digest, write_model


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("lineage")
    root, outside = base / "root", base / "outside"
    sd = {"root": mlp_state(0)}
    for i in range(3):
        sd[f"p{i}"] = fine_tune(sd["root"], 10 + i, 0.02, rank=2, noise=0.05)
    sd["child"] = fine_tune(sd["p0"], 99, 0.2, rank=2)
    sd["stranger"] = mlp_state(1)
    sd["p0-permuted"] = permutation_attack(sd["p0"], mlp_spec(sd["p0"]), seed=3)
    paths = {k: write_model(root / k, v) for k, v in sd.items()}
    write_model(outside / "secret", mlp_state(5))
    (root / "garbage").mkdir()
    (root / "garbage" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    save_file({"w": mlp_state(0)["0.weight"]}, str(outside / "detector.safetensors"))
    srv = ServerProcess(base / "data", [root])
    srv.start()
    client = srv.client()
    client.wait_ready()
    yield {"root": root, "outside": outside, "paths": paths, "client": client}
    client.close()
    srv.stop()


def _cands(env: dict, names: list[str]) -> dict[str, str]:
    return {n: str(env["paths"][n]) for n in names}


def test_detect_lineage_streams_and_equals_the_library_call(env: dict) -> None:
    c = env["client"]
    cands = _cands(env, ["root", "p0", "p1", "p2", "stranger"])
    child = str(env["paths"]["child"])
    events = list(c.detect_lineage(child, cands))
    kinds = [ev.WhichOneof("event") for ev in events]
    # progress first, then every candidate once, then the answer (last)
    assert kinds[-1] == "answer" and kinds.count("candidate") == 5 and "progress" in kinds
    assert kinds.index("candidate") > max(i for i, k in enumerate(kinds) if k == "progress")
    ranked = [ev.candidate for ev in events if ev.WhichOneof("event") == "candidate"]
    answer = events[-1].answer
    lib = detect_lineage(child, cands, child_name=child)
    assert [x.name for x in ranked] == [x.name for x in lib.candidates]
    assert [x.rank for x in ranked] == [x.rank for x in lib.candidates] == [1, 2, 3, 4, 5]
    for got, want in zip(ranked, lib.candidates, strict=True):
        assert got.score == pytest.approx(want.score, rel=1e-9, abs=1e-12) and got.related == want.related
        assert got.ref == want.ref
    assert answer.parent == lib.parent == "p0" and answer.answer == "parent"
    assert list(answer.chain) == lib.chain and answer.reason == lib.reason
    assert answer.result["thresholds"]["family"] == pytest.approx(0.8)
    # the "none" answer: the parent withheld
    _, none, _ = c.lineage_answer(child, _cands(env, ["p1", "p2", "stranger"]))
    lib_none = detect_lineage(child, _cands(env, ["p1", "p2", "stranger"]), child_name=child)
    assert (
        none.answer == "none"
        and none.parent == ""
        and lib_none.parent is None
        and none.reason == lib_none.reason
    )


def test_aligned_method_and_skipped_candidates(env: dict) -> None:
    c = env["client"]
    child = str(env["paths"]["child"])
    cands = {**_cands(env, ["p0-permuted", "p1", "stranger"]), "gone": str(env["root"] / "missing")}
    cands["broken"] = str(env["root"] / "garbage")
    ranked, answer, _ = c.lineage_answer(child, cands, method="aligned", architecture="mlp", layers=True)
    lib = detect_lineage(child, cands, method="aligned", architecture="mlp", child_name=child)
    assert [x.name for x in ranked] == [x.name for x in lib.candidates]
    assert ranked[0].name == "p0-permuted" and ranked[0].permuted and ranked[0].HasField("fixed_fraction")
    assert answer.parent == lib.parent == "p0-permuted"
    assert {s.name for s in answer.skipped} == {"gone", "broken"} == {s.name for s in lib.skipped}
    assert "layers" in ranked[0].details  # per-tensor evidence when asked for
    assert {m.name for m in c.list_lineage_methods()} == {"weights", "aligned", "learned"}


def test_lineage_bad_input_gets_the_right_code_and_writes_nothing(env: dict) -> None:
    c, root, outside = env["client"], env["root"], env["outside"]
    child, p0 = str(env["paths"]["child"]), str(env["paths"]["p0"])
    cases = [
        (child, [str(outside / "secret")], {}, "PERMISSION_DENIED", "outside the server's roots"),
        (child, ["p0/../../outside/secret"], {}, "INVALID_ARGUMENT", "'..'"),
        (str(root / "nope"), [p0], {}, "NOT_FOUND", "nope"),
        (str(root / "garbage"), [p0], {}, "INVALID_ARGUMENT", "garbage"),
        (child, [p0], {"method": "probe"}, "INVALID_ARGUMENT", "method"),
        (child, [], {}, "INVALID_ARGUMENT", "candidates"),
        (child, ["org/model"], {}, "FAILED_PRECONDITION", "Hub"),
        (child, [p0], {"method": "learned"}, "INVALID_ARGUMENT", "detector_ref"),
        (
            child,
            [p0],
            {"method": "learned", "detector_ref": str(outside / "detector.safetensors")},
            "PERMISSION_DENIED",
            "detector_ref",
        ),
        (
            child,
            [p0],
            {"method": "aligned", "spec_ref": str(outside / "spec.json")},
            "PERMISSION_DENIED",
            "spec_ref",
        ),
        (child, [p0], {"spectral": "maybe"}, "INVALID_ARGUMENT", "spectral"),
    ]
    before = tree_digest(root)
    for ch, cands, kw, code, text in cases:
        with pytest.raises(RemoteError) as e:
            c.lineage_answer(ch, cands, **kw)
        assert (e.value.code, text in e.value.message) == (code, True), (cands, kw, e.value.message)
        assert "Traceback" not in e.value.message
    assert tree_digest(root) == before


def test_cli_remote_lineage(env: dict) -> None:
    import json

    from click.testing import CliRunner

    from service.cli.main import main
    from tests.support.service import TOKEN

    conn = ["--server", env["client"].target, "--token", TOKEN]
    p = env["paths"]
    args = ["remote", "lineage", str(p["child"]), str(p["p0"]), str(p["p1"]), str(p["stranger"]), *conn]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"parent: {p['p0']}" in r.stdout and "unrelated" in r.stdout
    r = CliRunner().invoke(main, [*args, "--json"])
    assert json.loads(r.stdout)["answer"]["parent"] == str(p["p0"])
    r = CliRunner().invoke(
        main, ["remote", "lineage", str(p["child"]), str(env["outside"] / "secret"), *conn]
    )
    assert r.exit_code == 2 and "error: PERMISSION_DENIED" in r.output


def test_recover_model_graph_over_the_service_equals_the_library(env: dict) -> None:
    from metanets.lineage import recover_model_graph

    c = env["client"]
    models = _cands(env, ["root", "p0", "p1", "p2", "child", "stranger"])
    seen = []
    g = c.recover_model_graph(models, progress=seen.append)
    lib = recover_model_graph(models)
    assert seen and sorted(map(sorted, (f.models for f in g.families))) == sorted(map(sorted, lib.clusters))
    got = {(e.parent, e.child, e.kind) for e in g.edges}
    assert got == {(e.parent, e.child, e.kind) for e in lib.edges}
    assert ("p0", "child", "fine-tune") in got and set(g.roots) == set(lib.roots)
    assert g.graph["format"] == "weightsmith.model_graph"
    # bad input: one model, a path outside the roots, an unknown direction
    with pytest.raises(RemoteError) as e:
        c.recover_model_graph(_cands(env, ["root"]))
    assert e.value.code == "INVALID_ARGUMENT" and "at least two" in str(e.value)
    with pytest.raises(RemoteError) as e:
        c.recover_model_graph({**_cands(env, ["root"]), "x": str(env["outside"] / "secret")})
    assert e.value.code == "PERMISSION_DENIED"
    with pytest.raises(RemoteError) as e:
        c.recover_model_graph(_cands(env, ["root", "p0"]), direction="sideways")
    assert e.value.code == "INVALID_ARGUMENT"
    # the CLI
    from click.testing import CliRunner

    from service.cli.main import main
    from tests.support.service import TOKEN

    conn = ["--server", c.target, "--token", TOKEN]
    r = CliRunner().invoke(main, ["remote", "lineage-graph", *models.values(), *conn])
    assert r.exit_code == 0 and f"{env['paths']['p0']} -> {env['paths']['child']}" in r.stdout, r.output
