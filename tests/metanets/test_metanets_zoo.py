"""Model zoos: deterministic, resumable after a kill, the same bytes locally and on Dask; splits by run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from merge.errors import CheckpointError, InvalidArgumentError
from metanets.zoo import Zoo, build_zoo, load_zoo_config, plan_runs

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "name": "tiny",
    "seed": 3,
    "runs": 6,
    "checkpoints": [0, 1, 2],
    "tasks": ["digits", "parity"],
    "architectures": [
        {
            "kind": "mlp",
            "depth": [1, 2],
            "width": [8, 16],
            "activation": ["relu", "tanh"],
            "norm": ["none", "batchnorm"],
        },
        {
            "kind": "cnn",
            "layers": 1,
            "width": 4,
            "residual": [False, True],
            "norm": ["none", "batchnorm"],
            "weight": 0.5,
        },
    ],
    "hparams": {"epochs": {"int": [1, 3]}, "train_fraction": {"uniform": [0.1, 0.3]}},
}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "tiny"
    s = build_zoo(TINY, out, workers=1, progress=False)
    assert s.complete and s.runs == 6
    return out


def test_plans_are_seeded_and_varied():
    cfg = load_zoo_config(TINY)
    a, b = plan_runs(cfg), plan_runs(cfg)
    assert a == b
    assert len({json.dumps(p["arch"], sort_keys=True) for p in a}) > 2
    assert len({p["hparams"]["lr"] for p in a}) == 6
    other = plan_runs(load_zoo_config(dict(TINY, seed=4)))
    assert [p["seed"] for p in other] != [p["seed"] for p in a]


def test_zoo_records_metadata_lineage_and_lazy_tensors(tiny_zoo):
    z = Zoo(tiny_zoo)
    assert len(z) == sum(len({0, 1, 2} & set(range(p["hparams"]["epochs"] + 1)) | {p["hparams"]["epochs"]})
                         for p in plan_runs(load_zoo_config(TINY)))  # fmt: skip
    r = z.records[0]
    assert {"arch", "hparams", "task", "train_acc", "test_acc", "seed", "lineage", "sha256", "file"} <= set(r)
    assert r["lineage"]["previous"] is None and z.records[1]["lineage"]["previous"] in (None, r["id"])
    state = z.state_dict(0)
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) == r["n_params"]
    from safetensors import safe_open

    with safe_open(str(tiny_zoo / r["file"]), "pt") as f:  # the file carries its metadata too
        assert json.loads(f.metadata()["weightsmith.zoo"])["id"] == r["id"]
    spec = z.spec(0)
    assert set(spec.axes_to_perm) == {k for k, v in state.items() if v.is_floating_point()}
    assert 0.0 <= min(z.field("test_acc")) <= max(z.field("test_acc")) <= 1.0
    assert z.summary()["models"] == len(z)


def test_torch_dataset_reads_lazily(tiny_zoo):
    from torch.utils.data import DataLoader

    from metanets.zoo import ZooDataset

    z = Zoo(tiny_zoo)
    train, _val, _test = z.split((0.5, 0.25, 0.25))
    ds = ZooDataset(
        z, train, transform=lambda state, spec, rec: (sum(v.numel() for v in state.values()), rec["test_acc"])
    )
    assert len(ds) == len(train)
    batches = list(DataLoader(ds, batch_size=3, collate_fn=list))
    assert sum(len(b) for b in batches) == len(train)
    state, spec, rec = ZooDataset(z)[0]
    assert rec["id"] == z.records[0]["id"] and set(spec.axes_to_perm) <= set(state)


def test_splits_never_put_one_run_on_two_sides(tiny_zoo):
    z = Zoo(tiny_zoo)
    for seed in range(5):
        parts = z.split((0.5, 0.25, 0.25), seed=seed)
        runs = [{z.records[i]["run"] for i in p} for p in parts]
        assert sum(len(p) for p in parts) == len(z)
        assert not (runs[0] & runs[1]) and not (runs[0] & runs[2]) and not (runs[1] & runs[2])
    with pytest.raises(InvalidArgumentError, match="sum to 1"):
        z.split((0.5, 0.2))


def test_kill_and_resume_gives_the_same_bytes(tiny_zoo, tmp_path):
    """SIGKILL a real `weightsmith zoo build` mid-way; resuming yields the uninterrupted zoo byte for byte."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = (
        "import sys, time; from metanets.zoo import build_zoo;"
        "build_zoo(sys.argv[1], sys.argv[2], workers=1, progress=False, on_run=lambda r: time.sleep(0.5))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg), str(out)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(list((out / "runs").glob("r*.json"))) >= 2 if (out / "runs").exists() else False:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list((out / "runs").glob("r*.json")))
    assert 2 <= done < 6, done
    assert not (out / "index.jsonl").exists()
    with pytest.raises(CheckpointError, match="incomplete"):
        Zoo(out)
    s = build_zoo(cfg, out, workers=1, progress=False)
    assert s.complete and s.built_runs == 6 - done
    assert _hashes(out) == _hashes(tiny_zoo)


@pytest.mark.slow
def test_local_processes_and_a_dask_cluster_build_the_same_zoo(tiny_zoo, tmp_path):
    distributed = pytest.importorskip("distributed")
    s = build_zoo(TINY, tmp_path / "procs", workers=2, progress=False)
    assert s.executor == "2 processes"
    assert _hashes(tmp_path / "procs") == _hashes(tiny_zoo)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None, processes=True
    ) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        s = build_zoo(TINY, tmp_path / "dask", scheduler=cluster.scheduler_address, progress=False)
    assert s.executor.startswith("dask") and s.complete
    assert _hashes(tmp_path / "dask") == _hashes(tiny_zoo)


def test_bad_configs_and_folders(tmp_path, tiny_zoo):
    with pytest.raises(InvalidArgumentError, match="tasks.*unknown task"):
        load_zoo_config(dict(TINY, tasks=["imagenet"]))
    with pytest.raises(InvalidArgumentError, match="hparams.lr: a sampler is"):
        load_zoo_config(dict(TINY, hparams={"lr": {"normal": [0, 1]}}))
    with pytest.raises(InvalidArgumentError, match="runs"):
        load_zoo_config(dict(TINY, runs=0))
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_zoo_config(tmp_path / "nope.yaml")
    with pytest.raises(InvalidArgumentError, match="another config"):
        build_zoo(dict(TINY, seed=99), tiny_zoo, workers=1, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a zoo"):
        build_zoo(TINY, tmp_path / "busy", workers=1, progress=False)


def test_missing_or_corrupt_model_files_are_named(tiny_zoo, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_zoo, copy)
    z = Zoo(copy)
    f = copy / z.records[1]["file"]
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match=rf"'{z.records[1]['file']}'.*does not match its sha256"):
        z.state_dict(1)
    f.unlink()
    with pytest.raises(CheckpointError, match=rf"'{z.records[1]['file']}'.*is missing"):
        z.state_dict(1)
    assert torch.is_tensor(next(iter(z.state_dict(0).values())))
    with pytest.raises(CheckpointError, match="not a zoo"):
        Zoo(tmp_path)
