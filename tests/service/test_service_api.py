"""The gRPC service end to end: a real server subprocess on 127.0.0.1, the real client.

One server (token auth, a small per-tensor slow-down so that jobs can be watched and cancelled
mid-run) serves the whole module; tests that need a different configuration live in
test_service_faults.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from merge.plan import plan_merge
from service.client import RemoteError, state_name
from tests.support.service import (
    REPO,
    TOKEN,
    ServerProcess,
    files_of,
    linear_recipe,
    make_models,
    partials,
    tiny_state_dict,
    tree_digest,
    wait_for,
    write_model,
)

SLOW_LAYERS = 60  # 122 tensors x 0.03 s / 2 threads: about 2 s of merging


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("svc")
    root = base / "root"
    outside = base / "outside"
    models = make_models(root, 3)
    slow = make_models(root, 2, layers=SLOW_LAYERS, prefix="slow")
    make_models(outside, 1, prefix="secret")
    srv = ServerProcess(
        base / "data",
        [root],
        args=[
            "--max-running",
            "2",
            "--max-queued",
            "3",
            "--slow-down",
            "0.03",
            "--max-upload",
            "1MB",
            "--memory-budget",
            "300MB",
        ],
    )
    srv.start()
    client = srv.client()
    client.wait_ready()
    yield {
        "root": root,
        "outside": outside,
        "models": models,
        "slow": slow,
        "srv": srv,
        "client": client,
        "base": base,
    }
    client.close()
    srv.stop()


def _code(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.code


# -- health, reflection, auth ----------------------------------------------------------------------


def test_health_needs_no_token_and_reports_each_service(env: dict) -> None:
    srv = env["srv"]
    with srv.client(token=False) as anon:
        assert anon.health() == "SERVING"
        assert anon.health("weightsmith.v1.MergeService") == "SERVING"
        assert anon.health("weightsmith.v1.CheckpointService") == "SERVING"
        with pytest.raises(RemoteError) as e:
            anon.health("no.such.Service")
        assert _code(e) == "NOT_FOUND"


def _reflection(channel: grpc.Channel, metadata: tuple, request: object) -> object:
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)))


def test_reflection_lists_services_and_serves_descriptors(env: dict) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    srv = env["srv"]
    md = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(srv.target) as ch:
        resp = _reflection(ch, md, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in resp.list_services_response.service}
        assert {
            "weightsmith.v1.MergeService",
            "weightsmith.v1.CheckpointService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        resp = _reflection(
            ch,
            md,
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="weightsmith.v1.MergeService"),
        )
        fd = descriptor_pb2.FileDescriptorProto.FromString(
            resp.file_descriptor_response.file_descriptor_proto[0]
        )
        assert fd.name == "weightsmith/v1/merge_service.proto"
        assert "WatchMergeJob" in {m.name for m in fd.service[0].method}
        with pytest.raises(grpc.RpcError) as e:  # reflection is behind the token too
            _reflection(ch, (), reflection_pb2.ServerReflectionRequest(list_services=""))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_missing_or_wrong_token_is_rejected_on_every_kind_of_rpc(env: dict, tmp_path: Path) -> None:
    srv = env["srv"]
    for tok in (None, "wrong-token-123456"):
        with srv.client(token=tok or False) as c:
            with pytest.raises(RemoteError) as e:
                c.list_methods()  # unary
            assert _code(e) == "UNAUTHENTICATED"
            assert ("missing" if tok is None else "invalid") in e.value.message
            with pytest.raises(RemoteError) as e:
                list(c.watch("jobs/" + "0" * 32, reconnect=False))  # server streaming
            assert _code(e) == "UNAUTHENTICATED"
            with pytest.raises(RemoteError) as e:
                c.upload(env["models"][0])  # client streaming
            assert _code(e) == "UNAUTHENTICATED"
            with pytest.raises(RemoteError) as e:
                c.create_merge_job(linear_recipe(env["models"][:2]), output_path=str(tmp_path / "x"))
            assert _code(e) == "UNAUTHENTICATED"
    assert not any(p.name.startswith(".tmp-") for p in (env["base"] / "data" / "uploads").iterdir())


def test_list_methods_come_from_the_registry(env: dict) -> None:
    from merge.methods import all_methods

    methods = {m.name: m for m in env["client"].list_methods()}
    assert set(methods) == {s.name for s in all_methods()}
    lin = methods["linear"]
    params = {p.name: p for p in lin.parameters}
    assert params["weight"].per_model and not params["normalize"].per_model
    assert params["weight"].default_value.number_value == 1.0
    assert params["normalize"].default_value.bool_value is True
    from google.protobuf import json_format

    schema = json_format.MessageToDict(lin.parameter_schema)
    assert "weight" in schema["per_model"]["properties"] and "normalize" in schema["global"]["properties"]
    assert lin.paper and lin.url.startswith("http") and lin.kind == "per_tensor"


# -- merges ------------------------------------------------------------------------------------------


def test_merge_end_to_end_is_identical_to_the_cli(env: dict, tmp_path: Path) -> None:
    from service.cli.main import main as cli_main

    root, models = env["root"], env["models"]
    before = [tree_digest(m) for m in models]
    text = yaml.safe_dump(
        {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "models": [
                {"model": str(m), "parameters": {"weight": w}}
                for m, w in zip(models, [1.0, 2.0, 2.0], strict=True)
            ],
        }
    )
    c = env["client"]
    resp = c.create_merge_job(text, output_path="out/e2e", shard_size=1024)
    assert resp.plan.tensors_total == 10 and resp.plan.method == "linear"
    job = c.wait(resp.job.name, timeout=60)
    assert state_name(job.state) == "SUCCEEDED", job.error
    out = root / "out" / "e2e"
    assert c.job_result(job).output_path == str(out.resolve())
    assert c.job_result(job).tensors_total == 10 and len(c.job_result(job).shards) > 1
    # the same recipe through the CLI
    rfile = tmp_path / "recipe.yaml"
    rfile.write_text(text)
    r = CliRunner().invoke(
        cli_main, ["merge", str(rfile), "-o", str(tmp_path / "cli_out"), "--shard-size", "1024"]
    )
    assert r.exit_code == 0, r.output
    assert files_of(out) == files_of(tmp_path / "cli_out")
    assert [tree_digest(m) for m in models] == before
    # hand check of one tensor: weights 1 and 2 (normalised), stored in bfloat16
    name = "model.layers.1.mlp.up_proj.weight"
    ins = [load_file(str(m / "model.safetensors"))[name] for m in models]
    expect = ((1.0 * ins[0] + 2.0 * ins[1] + 2.0 * ins[2]) / 5.0).to(torch.bfloat16)
    from merge.checkpoint import open_checkpoint

    assert torch.equal(open_checkpoint(out)[name], expect)
    # the output is a reference too
    info = c.inspect(c.job_result(job).output_ref)
    assert info["tensors_total"] == 10 and {t["dtype"] for t in info["tensors"]} == {"bfloat16"}


def test_watch_streams_progress_and_resumes_from_a_sequence(env: dict) -> None:
    c = env["client"]
    job = c.create_merge_job(linear_recipe(env["slow"]), output_path="out/watched").job
    seen = []
    for ev in c.watch(job.name):
        seen.append(ev)
        if len(seen) == 3:
            break  # drop the stream mid-job
    assert state_name(seen[-1].job.state) in ("RUNNING", "QUEUED")
    for ev in c.watch(job.name, from_sequence=seen[-1].sequence):
        seen.append(ev)
    seqs = [e.sequence for e in seen]
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, nothing repeated
    assert state_name(seen[0].job.state) == "QUEUED" and state_name(seen[-1].job.state) == "SUCCEEDED"
    done = [e.job.progress.tensors_done for e in seen]
    assert done == sorted(done) and done[-1] == 2 * SLOW_LAYERS + 2
    assert sum(state_name(e.job.state) == "RUNNING" and 0 < e.job.progress.tensors_done for e in seen) >= 2
    # replay after the end: the same history
    replay = list(c.watch(job.name))
    assert [e.sequence for e in replay] == seqs
    assert c.job_result(replay[-1].job).tensors_total == 2 * SLOW_LAYERS + 2
    assert list(c.watch(job.name, from_sequence=seqs[-1])) == []


def test_cancel_a_running_job_leaves_nothing(env: dict) -> None:
    c, root = env["client"], env["root"]
    job = c.create_merge_job(linear_recipe(env["slow"]), output_path="out/cancelled").job
    wait_for(lambda: c.get_job(job.name).progress.tensors_done >= 4, what="progress")
    got = c.cancel_job(job.name)
    assert state_name(got.state) in ("RUNNING", "CANCELLED")
    final = c.wait(job.name, timeout=30)
    assert state_name(final.state) == "CANCELLED" and final.error.code == "CANCELLED"
    assert final.progress.tensors_done < 2 * SLOW_LAYERS + 2
    assert not (root / "out" / "cancelled").exists() and partials(root) == []
    with pytest.raises(RemoteError) as e:
        c.cancel_job(job.name)
    assert _code(e) == "FAILED_PRECONDITION"
    with pytest.raises(RemoteError) as e:
        c.cancel_job("0" * 32)
    assert _code(e) == "NOT_FOUND"
    with pytest.raises(RemoteError) as e:
        list(c.watch("jobs/" + "0" * 32))
    assert _code(e) == "NOT_FOUND"
    with pytest.raises(RemoteError) as e:
        c.retry_job(job.name)
    assert _code(e) == "FAILED_PRECONDITION"


def test_queue_rejects_beyond_its_limit_and_keeps_serving(env: dict) -> None:
    c, root = env["client"], env["root"]
    names = []
    with pytest.raises(RemoteError) as e:
        for i in range(10):
            names.append(c.create_merge_job(linear_recipe(env["slow"]), output_path=f"out/q{i}").job.name)
    assert _code(e) == "RESOURCE_EXHAUSTED" and "queue is full" in e.value.message
    assert len(names) == 5  # 2 running + 3 queued
    states = [state_name(c.get_job(n).state) for n in names]
    assert states.count("RUNNING") == 2 and states.count("QUEUED") == 3
    assert c.health() == "SERVING"
    queued = [n for n, s in zip(names, states, strict=True) if s == "QUEUED"]
    for n in queued:
        assert state_name(c.cancel_job(n).state) == "CANCELLED"
    finals = [c.wait(n, timeout=60) for n in names]
    assert sorted(state_name(j.state) for j in finals) == ["CANCELLED"] * 3 + ["SUCCEEDED"] * 2
    for n, j in zip(names, finals, strict=True):
        assert (root / "out" / f"q{names.index(n)}").exists() == (state_name(j.state) == "SUCCEEDED")


def test_list_jobs_pages_newest_first_and_filters(env: dict) -> None:
    c = env["client"]
    made = [
        c.create_merge_job(linear_recipe(env["models"][:2]), output_path=f"out/list{i}").job.name
        for i in range(3)
    ]
    for n in made:
        c.wait(n, timeout=60)
    everything = list(c.iter_jobs(page_size=2))
    assert [j.name for j in everything[:3]] == made[::-1]
    times = [j.create_time.ToNanoseconds() for j in everything]
    assert times == sorted(times, reverse=True) and len({j.name for j in everything}) == len(everything)
    first, token = c.list_jobs(page_size=2)
    assert len(first) == 2 and token
    cancelled = list(c.iter_jobs(["cancelled"]))
    assert cancelled and all(state_name(j.state) == "CANCELLED" for j in cancelled)
    with pytest.raises(RemoteError) as e:
        c.list_jobs(page_token="garbage")
    assert _code(e) == "INVALID_ARGUMENT"


def test_request_id_makes_creation_idempotent(env: dict) -> None:
    c = env["client"]
    text = linear_recipe(env["models"][:2])
    a = c.create_merge_job(text, output_path="out/idem", request_id="req-1").job
    b = c.create_merge_job(text, output_path="out/idem", request_id="req-1").job
    assert a.name == b.name
    with pytest.raises(RemoteError) as e:
        c.create_merge_job(text, output_path="out/idem-other", request_id="req-1")
    assert _code(e) == "ALREADY_EXISTS"
    assert state_name(c.wait(a.name, timeout=60).state) == "SUCCEEDED"


def test_memory_budget_admission(env: dict) -> None:
    """The engine's estimate (+ 64 MiB per worker) is the claim: beyond the budget -> refused; a job
    that fits alone but not next to a running one waits in the queue though a slot is free."""
    c, root = env["client"], env["root"]
    wide = root / "wide"
    if not wide.exists():
        base = tiny_state_dict(0, layers=SLOW_LAYERS)
        for i in range(2):
            sd = {
                **tiny_state_dict(i, layers=SLOW_LAYERS, base=base),
                "lm_head.weight": torch.full((1024, 1024), float(i)),
            }
            write_model(wide / f"w{i}", sd)
    text = linear_recipe([wide / "w0", wide / "w1"])
    staging = -(-plan_merge(yaml.safe_load(text)).bytes_out // 4096) * 4096  # the output, ~4 MiB, staged
    with pytest.raises(RemoteError) as e:  # 64 MiB + 16 threads x 2 MiB chunks x (2 x 2 inputs + 4) = 320 MiB
        c.create_merge_job(text, output_path="out/huge", workers=16)
    assert _code(e) == "RESOURCE_EXHAUSTED" and "budget" in e.value.message
    a = c.create_merge_job(text, output_path="out/mem-a").job  # 2 threads: 64 + 32 MiB + staging
    assert a.estimated_peak_bytes == (64 << 20) + 2 * (2 << 20) * 8 + staging
    wait_for(lambda: c.get_job(a.name).progress.tensors_done >= 2, what="job a running")
    b = c.create_merge_job(text, output_path="out/mem-b", workers=10).job  # 64 + 160 MiB: ~330 MiB with a
    assert state_name(c.get_job(b.name).state) == "QUEUED"
    assert state_name(c.get_job(a.name).state) == "RUNNING"
    assert state_name(c.wait(a.name, timeout=60).state) == "SUCCEEDED"
    assert state_name(c.wait(b.name, timeout=60).state) == "SUCCEEDED"
    ta, tb = c.get_job(a.name), c.get_job(b.name)
    assert tb.start_time.ToNanoseconds() >= ta.end_time.ToNanoseconds()
    assert (root / "out" / "mem-b" / "model.safetensors").read_bytes() == (
        root / "out" / "mem-a" / "model.safetensors"
    ).read_bytes()


def test_validate_only_plans_without_a_job(env: dict) -> None:
    c, root = env["client"], env["root"]
    n_before = len(list(c.iter_jobs()))
    resp = c.create_merge_job(linear_recipe(env["models"]), output_path="out/dry", validate_only=True)
    assert not resp.HasField("job") and resp.plan.tensors_total == 10 and resp.plan.bytes_out > 0
    assert len(list(c.iter_jobs())) == n_before and not (root / "out" / "dry").exists()


def test_recipe_as_struct(env: dict) -> None:
    c = env["client"]
    rec = {"merge_method": "linear", "models": [{"model": str(m)} for m in env["models"][:2]], "seed": 3}
    job = c.create_merge_job(rec, output_path="out/struct").job
    assert state_name(c.wait(job.name, timeout=60).state) == "SUCCEEDED"
    assert "seed: 3" in job.recipe_yaml


# -- bad input ---------------------------------------------------------------------------------------


def _bad_cases(env: dict) -> list[tuple[str, dict, str, str]]:
    root, outside, m = env["root"], env["outside"], env["models"]
    bad = root / "bad"
    if not bad.exists():
        write_model(bad / "narrow", tiny_state_dict(7, hidden=6))
        sd = tiny_state_dict(8)
        del sd["model.layers.2.mlp.up_proj.weight"]
        write_model(bad / "missing", sd)
        write_model(bad / "extra", {**tiny_state_dict(8), "extra.weight": torch.zeros(2)})
        garbage = write_model(bad / "garbage", tiny_state_dict(8))
        (garbage / "model.safetensors").write_bytes(b"garbage!garbage!")
        esc = write_model(bad / "index_escape", tiny_state_dict(8))
        (esc / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "../../../outside/secret0/model.safetensors"}})
        )
        mal = write_model(bad / "index_malformed", tiny_state_dict(8))
        (mal / "model.safetensors.index.json").write_text("{not json")
        trunc = write_model(bad / "truncated", tiny_state_dict(9))
        raw = (trunc / "model.safetensors").read_bytes()
        (trunc / "model.safetensors").write_bytes(raw[:-16])
        pk = bad / "pickled"
        pk.mkdir()
        torch.save(tiny_state_dict(10), pk / "pytorch_model.bin")
        (bad / "escape").symlink_to(outside / "secret0")
        (bad / "evil").mkdir()
        (bad / "evil" / "model.safetensors").symlink_to(outside / "secret0" / "model.safetensors")
        (bad / "existing").mkdir()
        entry = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
        hdr = f'{{"a":{entry},"a":{entry}}}'.encode()
        dup = bad / "dupkeys"
        dup.mkdir()
        (dup / "model.safetensors").write_bytes(len(hdr).to_bytes(8, "little") + hdr + bytes(8))
        (outside / "spec.json").write_text('{"perms": {}, "axes": {}}')
        (bad / "spec-link.json").symlink_to(outside / "spec.json")
    two = [str(m[0]), str(m[1])]

    def rebasin(spec: str) -> dict:
        return {"recipe_yaml": linear_recipe(two, parameters={"spec": spec}).replace("linear", "git_rebasin")}

    def concrete(plan: str) -> dict:
        return {
            "recipe_yaml": linear_recipe(two[1:], base_model=two[0], parameters={"plan": plan}).replace(
                "linear", "concrete_task_arithmetic"
            )
        }

    def rec(*refs: str, **kw: object) -> dict:
        return {"recipe_yaml": linear_recipe(list(refs), **kw)}

    return [
        ("yaml", {"recipe_yaml": "merge_method: [unclosed\n"}, "INVALID_ARGUMENT", "not valid YAML"),
        (
            "unknown-param",
            rec(*two, parameters={"densty": 0.5}),
            "INVALID_ARGUMENT",
            "has no parameter 'densty'",
        ),
        ("extra-tensor", rec(two[0], str(bad / "extra")), "INVALID_ARGUMENT", "extra.weight"),
        ("garbage-file", rec(two[0], str(bad / "garbage")), "INVALID_ARGUMENT", "garbage"),
        (
            "index-escape",
            rec(two[0], str(bad / "index_escape")),
            "INVALID_ARGUMENT",
            "escapes the checkpoint",
        ),
        ("index-malformed", rec(two[0], str(bad / "index_malformed")), "INVALID_ARGUMENT", "malformed index"),
        ("not-mapping", {"recipe_yaml": "- a\n- b\n"}, "INVALID_ARGUMENT", "mapping"),
        (
            "unknown-method",
            {"recipe_yaml": linear_recipe(two).replace("linear", "frobnicate")},
            "INVALID_ARGUMENT",
            "unknown merge method 'frobnicate'",
        ),
        ("wrong-type", rec(*two, parameters={"weight": "heavy"}), "INVALID_ARGUMENT", "'weight'"),
        (
            "wrong-type-normalize",
            rec(*two, parameters={"normalize": {"x": 1}}),
            "INVALID_ARGUMENT",
            "normalize",
        ),
        ("unknown-key", rec(*two, colour="red"), "INVALID_ARGUMENT", "colour"),
        ("empty-models", {"recipe_yaml": "merge_method: linear\nmodels: []\n"}, "INVALID_ARGUMENT", "empty"),
        ("shape-mismatch", rec(two[0], str(bad / "narrow")), "INVALID_ARGUMENT", "model.embed_tokens.weight"),
        (
            "missing-tensor",
            rec(two[0], str(bad / "missing")),
            "INVALID_ARGUMENT",
            "model.layers.2.mlp.up_proj.weight",
        ),
        ("truncated", rec(two[0], str(bad / "truncated")), "INVALID_ARGUMENT", "truncated"),
        ("duplicate-keys", rec(two[0], str(bad / "dupkeys")), "INVALID_ARGUMENT", "duplicate"),
        ("traversal", rec(two[0], "m0/../../outside/secret0"), "INVALID_ARGUMENT", "'..'"),
        ("outside", rec(two[0], str(outside / "secret0")), "PERMISSION_DENIED", "outside the server's roots"),
        (
            "symlink-escape",
            rec(two[0], str(bad / "escape")),
            "PERMISSION_DENIED",
            "outside the server's roots",
        ),
        ("symlinked-file", rec(two[0], str(bad / "evil")), "PERMISSION_DENIED", "symlink"),
        ("pickle", rec(two[0], str(bad / "pickled")), "FAILED_PRECONDITION", "pickle"),
        ("not-found", rec(two[0], str(root / "nope")), "NOT_FOUND", "nope"),
        ("hub-disabled", rec(two[0], "some-org/some-model"), "FAILED_PRECONDITION", "Hub"),
        ("out-outside", {**rec(*two), "output_path": str(outside / "o")}, "PERMISSION_DENIED", "output_path"),
        ("out-traversal", {**rec(*two), "output_path": "../o"}, "INVALID_ARGUMENT", "'..'"),
        ("out-exists", {**rec(*two), "output_path": str(bad / "existing")}, "ALREADY_EXISTS", "exists"),
        (
            "out-is-input",
            {**rec(*two), "output_path": two[1], "overwrite": True},
            "INVALID_ARGUMENT",
            "overlaps",
        ),
        (
            "out-is-root",
            {**rec(*two), "output_path": str(root), "overwrite": True},
            "INVALID_ARGUMENT",
            "root",
        ),
        ("compute-dtype", {**rec(*two), "compute_dtype": "float8"}, "INVALID_ARGUMENT", "compute_dtype"),
        (
            "struct-wrong-type",
            {"recipe_struct": {"merge_method": "linear", "models": "m0"}},
            "INVALID_ARGUMENT",
            "models",
        ),
        ("no-recipe", {}, "INVALID_ARGUMENT", "recipe"),
        # path-valued method parameters (registry FilePath) are confined to the roots as models are
        ("rebasin-spec-outside", rebasin(str(outside / "spec.json")), "PERMISSION_DENIED", "parameters.spec"),
        ("rebasin-spec-symlink", rebasin(str(bad / "spec-link.json")), "PERMISSION_DENIED", "symlink"),
        ("rebasin-spec-traversal", rebasin("m0/../../outside/spec.json"), "INVALID_ARGUMENT", "'..'"),
        ("concrete-plan-outside", concrete(str(outside / "plan")), "PERMISSION_DENIED", "parameters.plan"),
    ]


def test_bad_input_gets_the_right_code_and_writes_nothing(env: dict) -> None:
    c, root = env["client"], env["root"]
    cases = _bad_cases(env)
    jobs_before = len(list(c.iter_jobs()))
    tree_before = sorted(str(p) for p in root.rglob("*"))
    for label, req, code, text in cases:
        req = dict(req)
        recipe = req.pop("recipe_yaml", None) or req.pop("recipe_struct", None) or ""
        output = req.pop("output_path", f"out/bad-{label}")
        try:
            c.create_merge_job(recipe, output_path=output, **req)
        except RemoteError as err:
            assert (label, err.code) == (label, code), err.message
            assert text in err.message, (label, err.message)
            assert "Traceback" not in err.message
        else:
            pytest.fail(f"bad input '{label}' was accepted")
    assert len(list(c.iter_jobs())) == jobs_before
    assert sorted(str(p) for p in root.rglob("*")) == tree_before


def test_invalid_argument_names_the_field(env: dict) -> None:
    c = env["client"]
    with pytest.raises(RemoteError) as e:
        c.create_merge_job(linear_recipe(env["models"][:2]), output_path="out/f", compute_dtype="int3")
    assert e.value.field == "options.compute_dtype"
    with pytest.raises(RemoteError) as e:
        c.create_merge_job("merge_method: linear\nmodels: 5\n", output_path="out/f")
    assert e.value.field == "recipe" and "models" in e.value.message


def test_non_finite_input_fails_the_job_without_output(env: dict) -> None:
    c, root = env["client"], env["root"]
    sd = tiny_state_dict(11)
    sd["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")
    nan = write_model(root / "bad_nan", sd)
    job = c.create_merge_job(linear_recipe([env["models"][0], nan]), output_path="out/nan").job
    final = c.wait(job.name, timeout=60)
    assert state_name(final.state) == "FAILED" and final.error.code == "INVALID_ARGUMENT"
    assert "model.layers.3.mlp.down_proj.weight" in final.error.message
    assert not (root / "out" / "nan").exists() and partials(root) == []


# -- checkpoints: inspect, upload, download ----------------------------------------------------------


def test_inspect_lists_tensors_in_natural_order(env: dict) -> None:
    info = env["client"].inspect(str(env["slow"][0]))
    names = [t["name"] for t in info["tensors"]]
    assert info["tensors_total"] == len(names) == 2 * SLOW_LAYERS + 2
    i2, i10 = (
        names.index("model.layers.2.mlp.up_proj.weight"),
        names.index("model.layers.10.mlp.up_proj.weight"),
    )
    assert i2 < i10
    assert info["parameters_total"] == sum(
        int(__import__("math").prod(map(int, t["shape"]))) for t in info["tensors"]
    )
    with pytest.raises(RemoteError) as e:
        env["client"].inspect(str(env["outside"] / "secret0"))
    assert _code(e) == "PERMISSION_DENIED"


def test_upload_merge_download_roundtrip(env: dict, tmp_path: Path) -> None:
    c = env["client"]
    local = make_models(tmp_path / "local", 2, prefix="u")
    refs = [c.upload(p) for p in local]
    assert all(r.startswith("upload://") for r in refs)
    assert c.inspect(refs[0])["tensors_total"] == 10
    job = c.create_merge_job(linear_recipe(refs)).job  # no output_path: kept by the server
    final = c.wait(job.name, timeout=60)
    assert state_name(final.state) == "SUCCEEDED", final.error
    got = c.download(c.job_result(final).output_ref, tmp_path / "down")
    assert {p.name for p in got} >= {"model.safetensors", "config.json", "README.md"}
    ins = [load_file(str(p / "model.safetensors")) for p in local]
    out = load_file(str(tmp_path / "down" / "model.safetensors"))
    for k in ins[0]:
        assert torch.allclose(out[k], (ins[0][k] + ins[1][k]) / 2, atol=1e-7), k


def test_bad_uploads_are_refused_and_leave_nothing(env: dict, tmp_path: Path) -> None:
    from service._proto.weightsmith.v1 import checkpoint_service_pb2 as cpb

    c = env["client"]
    uploads = env["base"] / "data" / "uploads"
    before = sorted(p.name for p in uploads.iterdir())

    def send(msgs: list) -> RemoteError:
        with pytest.raises(RemoteError) as e:
            try:
                c.checkpoints.UploadCheckpoint(iter(msgs), metadata=c.metadata, timeout=30)
            except grpc.RpcError as err:
                raise RemoteError.from_rpc(err) from None
        return e.value

    def hdr(name: str, size: int, sha: str = "") -> cpb.UploadCheckpointRequest:
        return cpb.UploadCheckpointRequest(file=cpb.FileHeader(name=name, size=size, sha256=sha))

    def chunk(b: bytes) -> cpb.UploadCheckpointRequest:
        return cpb.UploadCheckpointRequest(chunk=b)

    good = tmp_path / "g.safetensors"
    save_file({"w": torch.ones(4)}, str(good))
    raw = good.read_bytes()
    assert send([hdr("model.safetensors", 2 << 20)]).code == "RESOURCE_EXHAUSTED"  # over --max-upload 1MB
    assert send([hdr("model.safetensors", len(raw), "0" * 64), chunk(raw)]).code == "DATA_LOSS"
    assert send([hdr("pytorch_model.bin", 10), chunk(b"0" * 10)]).code == "FAILED_PRECONDITION"
    assert send([hdr("../model.safetensors", len(raw)), chunk(raw)]).code == "INVALID_ARGUMENT"
    assert send([hdr("notes.txt", 3), chunk(b"abc")]).code == "INVALID_ARGUMENT"
    assert send([chunk(raw)]).code == "INVALID_ARGUMENT"
    assert send([hdr("model.safetensors", len(raw)), chunk(raw + b"x")]).code == "INVALID_ARGUMENT"
    assert send([hdr("model.safetensors", len(raw)), chunk(raw[:-1])]).code == "INVALID_ARGUMENT"
    assert (
        send([hdr("model.safetensors", len(raw)), chunk(raw[:8] + b"{" * (len(raw) - 8))]).code
        == "INVALID_ARGUMENT"
    )
    assert send([hdr("config.json", 2), chunk(b"{}")]).code == "INVALID_ARGUMENT"  # no weights
    big = tmp_path / "big"
    write_model(big, {"w": torch.zeros(300_000)})  # 1.2 MB
    with pytest.raises(RemoteError) as e:
        c.upload(big)
    assert _code(e) == "RESOURCE_EXHAUSTED"
    assert sorted(p.name for p in uploads.iterdir()) == before
    with pytest.raises(RemoteError) as e:
        c.download(str(env["slow"][0] / ".." / "m0"), tmp_path / "d")
    assert _code(e) == "INVALID_ARGUMENT"


def test_remote_cli_merge_jobs_cancel(env: dict, tmp_path: Path) -> None:
    from service.cli.service import remote

    srv, root = env["srv"], env["root"]
    conn = ["--server", srv.target, "--token", TOKEN]
    rfile = tmp_path / "r.yaml"
    rfile.write_text(linear_recipe(env["models"][:2]))
    r = CliRunner().invoke(remote, ["merge", str(rfile), "-o", "out/cli-remote", "--json", *conn])
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert (
        job["state"] == "JOB_STATE_SUCCEEDED" and (root / "out" / "cli-remote" / "model.safetensors").exists()
    )
    r = CliRunner().invoke(remote, ["jobs", "--json", "--limit", "1", *conn])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["name"] == job["name"]
    r = CliRunner().invoke(remote, ["merge", str(rfile), "-o", "out/cli-remote", *conn])
    assert r.exit_code == 2 and "ALREADY_EXISTS" in r.stderr
    slow = tmp_path / "slow.yaml"
    slow.write_text(linear_recipe(env["slow"]))
    r = CliRunner().invoke(remote, ["merge", str(slow), "-o", "out/cli-cancel", "--detach", *conn])
    assert r.exit_code == 0, r.output
    name = r.stdout.strip()
    r = CliRunner().invoke(remote, ["cancel", name, *conn])
    assert r.exit_code == 0, r.output
    assert state_name(env["client"].wait(name, timeout=30).state) == "CANCELLED"
    r = CliRunner().invoke(remote, ["jobs", "--server", srv.target, "--token", "bad-token-1234"])
    assert r.exit_code == 2 and "UNAUTHENTICATED" in r.stderr
    r = CliRunner().invoke(remote, ["merge", str(rfile), "--dry-run", *conn])
    assert r.exit_code == 0 and "no job created" in r.stdout
    # local models uploaded by the CLI, output downloaded back
    local = make_models(tmp_path / "local", 2, prefix="c")
    rl = tmp_path / "local.yaml"
    rl.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(p)} for p in local]}))
    r = CliRunner().invoke(
        remote, ["merge", str(rl), "--upload-local", "--download", str(tmp_path / "dl"), *conn]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dl" / "model.safetensors").exists()


_ABS = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;()\[\]{}<>]+")  # an absolute path (not ../x, not upload://)


def _assert_reveals_no_server_path(label: str, message: str, sent: list[str], env: dict) -> None:
    """Every absolute path in ``message`` is inside the root or is (below) a path the caller sent;
    the server's data folder, working directory and symlink targets never appear (issue 22)."""
    root = env["root"]
    for token in _ABS.findall(message):
        p = token.rstrip(".:")
        ok = Path(p).is_relative_to(root) or any(p == s or p.startswith(s.rstrip("/") + "/") for s in sent)
        assert ok, (label, p, message)
    for secret in (str(env["base"] / "data"), str(REPO), "/etc"):
        if not any(secret in s for s in sent):
            assert secret not in message, (label, secret, message)


def test_error_messages_reveal_no_server_path(env: dict, tmp_path: Path) -> None:
    """A sweep of the error paths: the bad merges, symlinks out of the root (to /etc, to the server's
    working directory through /proc), malformed uploads, downloads and a failed job's message."""
    from service._proto.weightsmith.v1 import checkpoint_service_pb2 as cpb

    c, root = env["client"], env["root"]
    cases = _bad_cases(env)
    links = root / "bad" / "links"
    if not links.exists():
        links.mkdir()
        (links / "etc").symlink_to("/etc")
        (links / "cwd").symlink_to("/proc/self/cwd")
    two = [str(env["models"][0]), str(env["models"][1])]
    for ref in ("/proc/self/cwd", "/proc/self/cwd/service", str(links / "etc"), str(links / "cwd"), "/etc/passwd"):
        cases.append((f"ref {ref}", {"recipe_yaml": linear_recipe([two[0], ref])}, None, None))
    cases.append(("out-symlink", {"recipe_yaml": linear_recipe(two), "output_path": str(links / "etc")}, None, None))
    seen = 0
    for label, req, _code, _text in cases:
        req = dict(req)
        recipe = req.pop("recipe_yaml", None) or req.pop("recipe_struct", None) or ""
        output = req.pop("output_path", f"out/leak-{len(label)}")
        sent = [s for s in (*two, output, *_ABS.findall(str(recipe))) if s.startswith("/")]
        with pytest.raises(RemoteError) as e:
            c.create_merge_job(recipe, output_path=output, **req)
        _assert_reveals_no_server_path(label, e.value.message, sent, env)
        seen += 1

    def upload(msgs: list) -> str:
        with pytest.raises(RemoteError) as e:
            try:
                c.checkpoints.UploadCheckpoint(iter(msgs), metadata=c.metadata, timeout=30)
            except grpc.RpcError as err:
                raise RemoteError.from_rpc(err) from None
        return e.value.message

    good = tmp_path / "g.safetensors"
    save_file({"w": torch.ones(4)}, str(good))
    raw = good.read_bytes()
    hdr = cpb.UploadCheckpointRequest(file=cpb.FileHeader(name="model.safetensors", size=len(raw)))
    for label, body in (("garbled header", raw[:8] + b"{" * (len(raw) - 8)), ("zeros", bytes(len(raw)))):
        msg = upload([hdr, cpb.UploadCheckpointRequest(chunk=body)])
        _assert_reveals_no_server_path(label, msg, [], env)
        seen += 1
    for ref in ("/proc/self/cwd", str(links / "etc"), str(links / "cwd")):
        with pytest.raises(RemoteError) as e:
            c.download(ref, tmp_path / "d")
        _assert_reveals_no_server_path(f"download {ref}", e.value.message, [ref], env)
        seen += 1
    assert seen == len(cases) + 5


def test_merge_service_rpcs_are_the_merge_view_of_the_job_service(env: dict) -> None:
    """A merge is an ordinary job: MergeService's Get/Watch/Cancel/Retry/List answer what JobService
    answers for the same job, in the contract's MergeJob shape (recipe, method, options, result)."""
    from service._proto.weightsmith.v1 import merge_service_pb2 as mpb
    from service.messages import merge_job_pb

    c = env["client"]
    resp = c.create_merge_job(
        linear_recipe(env["models"][:2]), output_path="out/view", workers=3, compute_dtype="float64"
    )
    created = resp.job
    assert created.method == "linear" and created.options.workers == 3
    assert created.options.compute_dtype == "float64"
    assert yaml.safe_load(created.recipe_yaml)["merge_method"] == "linear"
    events = list(c._watch(
        lambda seq, remaining: c.merge.WatchMergeJob(
            mpb.WatchMergeJobRequest(name=created.name, from_sequence=seq), metadata=c.metadata, timeout=remaining
        ),
        created.name, 0, reconnect=False, max_reconnect_s=0, timeout=60,
    ))
    generic = list(c.watch(created.name, timeout=60))
    assert [e.sequence for e in events] == [e.sequence for e in generic]
    assert [e.job for e in events] == [merge_job_pb(e.job) for e in generic]
    got = c._call(c.merge.GetMergeJob, mpb.GetMergeJobRequest(name=created.name)).job
    job = c.get_job(created.name)
    assert job.kind == "merge" and got == merge_job_pb(job)
    assert state_name(got.state) == "SUCCEEDED" and got.result.output_path.endswith("out/view")
    assert (got.recipe_yaml, got.method, got.options) == (created.recipe_yaml, "linear", created.options)
    assert c.job_result(job) == got.result
    stored = json.loads((env["srv"].data_dir / "jobs" / created.name[5:] / "result.json").read_text())
    assert stored["planned_in_worker"] is False  # planned once, at admission
    listed = c._call(c.merge.ListMergeJobs, mpb.ListMergeJobsRequest(page_size=1000)).jobs
    assert got in listed and all(j == merge_job_pb(c.get_job(j.name)) for j in listed[:3])
    ended = ((c.merge.CancelMergeJob, mpb.CancelMergeJobRequest), (c.merge.RetryMergeJob, mpb.RetryMergeJobRequest))
    for rpc, req in ended:
        with pytest.raises(RemoteError) as e:
            c._call(rpc, req(name=created.name))
        assert e.value.code == "FAILED_PRECONDITION"  # it ended: nothing to cancel, nothing to retry
    # the generic client calls reach merges too; the old names still work, with a warning
    with pytest.warns(DeprecationWarning, match="get_job"):
        assert c.get_any_job(created.name) == job


def test_a_gguf_model_under_the_roots_merges_through_the_service(env: dict) -> None:
    """GGUF inputs are checkpoints like any other on the server: planned at admission (the plan handed to
    the worker pickled by file list), merged with a safetensors model of the family."""
    pytest.importorskip("gguf")
    from merge.checkpoint import open_checkpoint
    from testkit.gguf import llama_gguf, tiny_llama

    root = env["root"]
    model, sd = tiny_llama(0)
    g = llama_gguf(root / "tiny-q8.gguf", model, sd, "Q8_0")
    m1, _ = tiny_llama(1)
    m1.save_pretrained(root / "tiny-hf")
    c = env["client"]
    recipe = yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                             "models": [{"model": str(root / "tiny-hf")}, {"model": str(g)}]})
    resp = c.create_merge_job(recipe, output_path="out/from-gguf")
    assert resp.plan.tensors_total == len(sd)
    done = c.wait(resp.job.name, timeout=120)
    assert state_name(done.state) == "SUCCEEDED", done.error
    out, gg = open_checkpoint(root / "out" / "from-gguf"), open_checkpoint(g)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(out[k], (v + gg[k].float()) / 2, rtol=0, atol=1e-6)


def test_inspect_gives_shapes_and_sizes_as_numbers(env: dict) -> None:
    info = env["client"].inspect(str(env["models"][0]))
    t = info["tensors"][0]
    assert all(isinstance(d, int) for d in t["shape"]) and isinstance(t["nbytes"], int) and t["nbytes"] > 0
