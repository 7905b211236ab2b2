"""AlignmentService and JobService against the real server on 127.0.0.1: an "align" job's result equals
the library call (merge.rebasin.api.rebasin) on the same checkpoints; bad input; cancel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from merge.rebasin.api import rebasin
from metanets.lineage.stats import single_torch_thread
from service._proto.weightsmith.v1 import merge_service_pb2 as mpb
from service.client import RemoteError, state_name
from tests.support.service import ServerProcess, partials, tree_digest, wait_for, write_model


def _mlp(seed: int, dims: tuple[int, ...] = (6, 16, 16, 3)) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    return {k: v.detach().clone() for k, v in nn.Sequential(*layers[:-1]).state_dict().items()}


def _forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    n = len([k for k in sd if k.endswith(".weight")])
    for i in range(n):
        x = x @ sd[f"{2 * i}.weight"].T + sd[f"{2 * i}.bias"]
        if i < n - 1:
            x = torch.relu(x)
    return x


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("align")
    root, outside = base / "root", base / "outside"
    a = write_model(root / "a", _mlp(0), {"architectures": ["MLP"]})
    b = write_model(root / "b", _mlp(1), {"architectures": ["MLP"]})
    write_model(outside / "c", _mlp(2))
    write_model(root / "narrow", _mlp(3, (6, 8, 16, 3)))
    (root / "garbage").mkdir()
    (root / "garbage" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    srv = ServerProcess(
        base / "data", [root], args=["--slow-down", "0.3", "--max-running", "2", "--job-threads", "1"]
    )
    srv.start()
    client = srv.client()
    client.wait_ready()
    yield {"root": root, "outside": outside, "a": a, "b": b, "srv": srv, "client": client}
    client.close()
    srv.stop()


def test_align_job_equals_the_library_call(env: dict) -> None:
    c, a, b = env["client"], env["a"], env["b"]
    job = c.create_align_job(str(a), str(b), architecture="mlp", output_path="out/b-aligned", n_restarts=2)
    assert job.kind == "align" and job.name.startswith("jobs/")
    phases = [ev.job.progress.phase for ev in c.watch(job.name, timeout=120)]
    done = c.get_job(job.name)
    assert state_name(done.state) == "SUCCEEDED", done.error.message
    assert {"matching", "writing"} <= set(phases)
    res = c.job_result(done)
    with single_torch_thread():  # as the server's workers (--job-threads 1): cost sums depend on threads
        lib = rebasin(
            load_file(a / "model.safetensors"),
            load_file(b / "model.safetensors"),
            architecture="mlp",
            n_restarts=2,
        )
    assert res.permutations_inline and {p.id: list(p.indices) for p in res.permutations} == {
        k: v.tolist() for k, v in lib.perms.items()
    }
    assert res.objective == pytest.approx(lib.result.objective, rel=1e-6)
    out = Path(res.output_path)
    assert out == env["root"] / "out" / "b-aligned" and res.output_ref == f"job://{done.name[5:]}"
    got = load_file(out / "model.safetensors")
    assert set(got) == set(lib.state) and all(torch.equal(got[k], lib.state[k]) for k in got)
    x = torch.randn(5, 6)
    bsd = load_file(b / "model.safetensors")
    assert torch.allclose(_forward(got, x), _forward(bsd, x), atol=1e-5)  # pi(B) computes B's function
    assert (out / "config.json").exists() and (out / "alignment" / "permutation_spec.json").exists()
    perms = load_file(out / "alignment" / "permutations.safetensors")
    assert {k: v.tolist() for k, v in perms.items()} == {k: v.tolist() for k, v in lib.perms.items()}
    # JobService sees it; MergeService does not (a merge-only view)
    assert done.name in [j.name for j in c.list_jobs(kinds=["align"])[0]]
    merge_jobs = c._call(c.merge.ListMergeJobs, mpb.ListMergeJobsRequest(page_size=1000)).jobs
    assert done.name not in [j.name for j in merge_jobs]
    with pytest.raises(RemoteError) as e:
        c._call(c.merge.GetMergeJob, mpb.GetMergeJobRequest(name=done.name))
    assert e.value.code == "NOT_FOUND"
    assert {k.name for k in c.list_job_kinds()} >= {"merge", "align"}
    methods = c.list_alignment_methods()
    assert "mlp" in methods.architectures and [m.name for m in methods.methods] == ["weight"]
    rebasin_params = {p.name: p for m in c.list_methods() if m.name == "git_rebasin" for p in m.parameters}
    assert rebasin_params["spec"].path and not rebasin_params["architecture"].path
    assert all(
        c.health(s) == "SERVING" for s in ("weightsmith.v1.JobService", "weightsmith.v1.AlignmentService")
    )
    # the aligned output is a reference other jobs take: re-aligning pi(B) to A finds the identity
    again = c.wait(c.create_align_job(str(a), res.output_ref, architecture="mlp").name, timeout=120)
    assert state_name(again.state) == "SUCCEEDED", again.error.message
    r2 = c.job_result(again)
    assert r2.units_fixed == r2.units_total


def test_align_bad_input_gets_the_right_code_and_writes_nothing(env: dict) -> None:
    c, root, a, b = env["client"], env["root"], str(env["a"]), str(env["b"])
    (env["outside"] / "spec.json").write_text("{}")
    cases = [
        ({"model_a": a, "model_b": b}, "INVALID_ARGUMENT", "exactly one of architecture or spec_ref"),
        ({"model_a": a, "model_b": b, "architecture": "lstm"}, "INVALID_ARGUMENT", "unknown architecture"),
        ({"model_a": a, "model_b": b, "architecture": "mlp", "method": "ste"}, "INVALID_ARGUMENT", "method"),
        (
            {"model_a": a, "model_b": str(env["outside"] / "c"), "architecture": "mlp"},
            "PERMISSION_DENIED",
            "roots",
        ),
        (
            {"model_a": a, "model_b": b, "spec_ref": str(env["outside"] / "spec.json")},
            "PERMISSION_DENIED",
            "spec_ref",
        ),
        ({"model_a": a, "model_b": str(root / "nope"), "architecture": "mlp"}, "NOT_FOUND", "nope"),
        (
            {"model_a": a, "model_b": str(root / "garbage"), "architecture": "mlp"},
            "INVALID_ARGUMENT",
            "garbage",
        ),
        ({"model_a": a, "model_b": str(root / "narrow"), "architecture": "mlp"}, "INVALID_ARGUMENT", "shape"),
        (
            {"model_a": a, "model_b": b, "architecture": "mlp", "output_path": str(env["outside"] / "o")},
            "PERMISSION_DENIED",
            "output_path",
        ),
        ({"model_a": a, "model_b": b, "architecture": "mlp", "output_path": "b"}, "ALREADY_EXISTS", "exists"),
        ({"model_a": a, "model_b": "org/model", "architecture": "mlp"}, "FAILED_PRECONDITION", "Hub"),
    ]
    n_jobs = len(c.list_jobs(page_size=1000)[0])
    before = tree_digest(root), tree_digest(env["outside"])
    for req, code, text in cases:
        req = dict(req)
        with pytest.raises(RemoteError) as e:
            c.create_align_job(req.pop("model_a"), req.pop("model_b"), **req)
        assert (e.value.code, text in e.value.message) == (code, True), (req, e.value.message)
        assert "Traceback" not in e.value.message
    assert (tree_digest(root), tree_digest(env["outside"])) == before
    assert len(c.list_jobs(page_size=1000)[0]) == n_jobs


def test_align_cancel_leaves_nothing_and_idempotent_create(env: dict) -> None:
    c, a, b, root = env["client"], str(env["a"]), str(env["b"]), env["root"]
    job = c.create_align_job(a, b, architecture="mlp", output_path="out/cancelled", request_id="r-cancel")
    assert c.create_align_job(
        a, b, architecture="mlp", output_path="out/cancelled", request_id="r-cancel"
    ).name == (job.name)
    with pytest.raises(RemoteError) as e:
        c.create_align_job(a, b, architecture="mlp", output_path="out/other", request_id="r-cancel")
    assert e.value.code == "ALREADY_EXISTS"
    wait_for(lambda: c.get_job(job.name).progress.phase == "writing", 60, what="writing phase")
    c.cancel_job(job.name)
    end = c.wait(job.name, timeout=60)
    assert state_name(end.state) == "CANCELLED"
    assert not (root / "out" / "cancelled").exists() and not partials(root)
    with pytest.raises(RemoteError) as e:
        c.cancel_job(job.name)
    assert e.value.code == "FAILED_PRECONDITION"


def test_cli_remote_align_and_job_commands(env: dict) -> None:
    import json

    from click.testing import CliRunner

    from service.cli.main import main
    from tests.support.service import TOKEN

    conn = ["--server", env["srv"].target, "--token", TOKEN]
    a, b = str(env["a"]), str(env["b"])
    r = CliRunner().invoke(
        main, ["remote", "align", a, b, "--architecture", "mlp", "-o", "out/cli", "--json", *conn]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["job"]["kind"] == "align" and out["result"]["output_path"].endswith("out/cli")
    assert out["result"]["permutations_inline"] and int(out["result"]["units_total"]) == 32
    r = CliRunner().invoke(main, ["remote", "job", "list", "--kind", "align", *conn])
    assert r.exit_code == 0 and out["job"]["name"][5:] in r.stdout and "SUCCEEDED" in r.stdout
    r = CliRunner().invoke(main, ["remote", "align", a, b, "--architecture", "mlp", "-o", "out/cli", *conn])
    assert r.exit_code == 2 and "error: ALREADY_EXISTS" in r.output
    r = CliRunner().invoke(main, ["remote", "job", "cancel", out["job"]["name"], *conn])
    assert r.exit_code == 2 and "FAILED_PRECONDITION" in r.output
