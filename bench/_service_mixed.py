"""The mixed-load phase of ``bench/service_load.py``: merges, metanet predictions and lineage queries
from several client processes at once against one server, with every answer checked.

Inputs are made here (offline): the load phase's merge recipes, a tiny model zoo built with
``metanets.zoo.build_zoo`` and a metanet trained on it *by the server* (a "train" job), and a small
lineage family (a root MLP, three fine-tuned children and a grandchild, low-rank updates as
fine-tuning makes). References are computed in this process with the library on the same inputs:
``metanets.train.predict`` for the predictions, ``metanets.lineage.detect_lineage`` for the answer,
the CLI's merge output digest for merges. Each client runs ``rounds`` rounds of (merge, predict,
lineage) in a client-specific rotation, so the three kinds overlap on the server.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ZOO = {
    "name": "bench-mixed",
    "seed": 3,
    "runs": 6,
    "checkpoints": [0, 1, 2],
    "tasks": ["digits"],
    "architectures": [
        {"kind": "mlp", "depth": [1, 2], "width": 16, "activation": ["relu", "tanh"], "norm": "none"}
    ],
}
TRAIN = {"model": "gmn", "epochs": 3, "batch_size": 6, "split": [0.5, 0.25, 0.25], "patience": 50}
MODEL_ARGS = {"hidden": 8, "layers": 1}


def _mlp(seed: int, widths: tuple[int, ...] = (64, 96, 96, 10)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        sd[f"{2 * i}.weight"] = torch.randn(b, a, generator=g) / math.sqrt(a)
        sd[f"{2 * i}.bias"] = 0.1 * torch.randn(b, generator=g)
    return sd


def _fine_tune(sd: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.dim() == 2:
            d = torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
            out[k] = v + d / d.norm() * scale * v.norm()
        else:
            out[k] = v + scale * v.norm() / math.sqrt(v.numel()) * torch.randn(v.shape, generator=g)
    return out


def prepare(root: Path, client: Any, recipes: list[str], ref_digests: dict[int, str]) -> dict[str, Any]:
    """Zoo, server-trained metanet, lineage family and the library's reference answers."""
    from metanets.lineage import detect_lineage
    from metanets.train import predict
    from metanets.zoo import Zoo, build_zoo

    zoo_dir = root / "mixed" / "zoo"
    build_zoo(ZOO, zoo_dir, workers=1, progress=False)
    job = client.create_train_job(
        str(zoo_dir), model_args=MODEL_ARGS, output_path=str(root / "mixed" / "mn"), **TRAIN
    )
    done = client.wait(job.name, timeout=600)
    metanet = client.job_result(done).metanet.name
    files = [str(zoo_dir / r["file"]) for r in Zoo(zoo_dir).records]
    ref_pred = [r["prediction"] for r in predict(root / "mixed" / "mn", files)]
    fam = {"root": _mlp(0)}
    for i in range(3):
        fam[f"p{i}"] = _fine_tune(fam["root"], 10 + i, 0.05)
    fam["child"] = _fine_tune(fam["p0"], 99, 0.2)
    fam["stranger"] = _mlp(1)
    paths = {}
    for k, sd in fam.items():
        (root / "mixed" / "lineage" / k).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(root / "mixed" / "lineage" / k / "model.safetensors"))
        paths[k] = str(root / "mixed" / "lineage" / k)
    cands = {k: paths[k] for k in ("root", "p0", "p1", "p2", "stranger")}
    lib = detect_lineage(paths["child"], cands, child_name=paths["child"])
    return {
        "metanet": metanet,
        "files": files,
        "ref_pred": ref_pred,
        "child": paths["child"],
        "cands": cands,
        "ref_parent": lib.parent,
        "ref_ranking": [c.name for c in lib.candidates],
        "recipes": recipes,
        "ref_digests": ref_digests,
    }


def _worker(target: str, token: str, ctx: dict[str, Any], cid: int, rounds: int, out_root: str, start: Any,
            results: Any, deadline: float) -> None:  # fmt: skip
    import hashlib
    import re

    from service.client import Client, state_name

    def digest_tree(folder: Path) -> str:  # as service_load.digest: the merged weights' bytes
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    rows = []
    kinds = ["merge", "predict", "lineage"]
    with Client(target, token=token, timeout=120) as c:
        start.wait()
        for r in range(rounds):
            for k in kinds[cid % 3 :] + kinds[: cid % 3]:
                t0 = time.perf_counter()
                row: dict[str, Any] = {"rpc": k, "client": cid, "round": r, "ok": False}
                try:
                    if k == "merge":
                        i = (cid + r) % len(ctx["recipes"])
                        out = f"{out_root}/c{cid}_r{r}"
                        job = c.create_merge_job(ctx["recipes"][i], output_path=out).job
                        final = c.wait(job.name, timeout=max(1.0, deadline - time.time()))
                        m = re.search(r"/set(\d+)/m0", ctx["recipes"][i])
                        ok = state_name(final.state) == "SUCCEEDED" and m is not None
                        row["ok"] = ok and digest_tree(Path(out)) == ctx["ref_digests"][int(m.group(1))]
                    elif k == "predict":
                        resp = c.predict(ctx["metanet"], ctx["files"])
                        got = [p.number for p in resp.predictions]
                        row["ok"] = len(got) == len(ctx["ref_pred"]) and all(
                            abs(a - b) <= 1e-6 for a, b in zip(got, ctx["ref_pred"], strict=True)
                        )
                        row["n"] = len(got)
                    else:
                        ranked, answer, _ = c.lineage_answer(ctx["child"], ctx["cands"])
                        row["ok"] = (
                            answer.parent == ctx["ref_parent"]
                            and [x.name for x in ranked] == ctx["ref_ranking"]
                        )
                except Exception as e:  # noqa: BLE001 - counted as a failure, with its message
                    row["error"] = f"{type(e).__name__}: {e}"
                row["s"] = time.perf_counter() - t0
                rows.append(row)
    results.put(rows)


def run_mixed(target: str, token: str, ctx: dict[str, Any], clients: int, rounds: int, out_root: Path,
              deadline: float) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    mctx = mp.get_context("spawn")
    start, results = mctx.Event(), mctx.Queue()
    procs = [
        mctx.Process(
            target=_worker, args=(target, token, ctx, i, rounds, str(out_root), start, results, deadline)
        )
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    time.sleep(1.5)
    t0 = time.perf_counter()
    start.set()
    rows: list[dict[str, Any]] = []
    for _ in procs:
        rows += results.get(timeout=max(1.0, deadline - time.time()))
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(30)
    return rows, wall
