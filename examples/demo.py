"""`make demo`: the whole system in about two minutes on a 2-core CPU, offline, servers on 127.0.0.1 only.

0. **merge (CLI)**: a LLaMA-shaped base and two "fine-tunes" (sharded safetensors, bf16); ``weightsmith
   merge`` of a TIES recipe (per-layer density gradient) and a SLERP recipe (filters); one merged tensor
   checked against a direct call of the method;
1. **service**: ``weightsmith serve`` on 127.0.0.1 (a random bearer token), a merge job submitted over
   gRPC (``service.client.Client``), its progress events watched and printed; the output is compared
   with the same recipe merged by the library (``merge.execute.run_merge``);
2. **Hub**: the local Hub-compatible server of the tests (``testkit/hub_server.py``) on 127.0.0.1;
   ``weightsmith merge --endpoint`` of ``hub-demo/base`` and ``hub-demo/math@<commit>`` after the branch
   has moved on: the model card records the pinned commit and the weights are those of that commit;
3. **lineage**: someone fine-tuned our TIES merge; ``detect_lineage(child, candidates)`` names its
   parent among the demo's models, and the family tree is drawn;
4. **Git Re-Basin**: two small MLPs trained on sklearn's digits from different seeds; weight matching
   aligns B to A and the loss barrier on the straight line between them drops;
5. **metanet**: a tiny zoo of digits MLPs (checkpoints along training) and a GMN that predicts a
   network's test accuracy from its weights (``train_metanet`` / ``predict``).

Everything is written under ``examples/out/demo/`` (pictures: ``lineage_tree.png``/``.svg``,
``rebasin.png``, ``predict_accuracy.png``; ``summary.json``). ``main()`` returns the key results.

Run: ``.venv/bin/python examples/demo.py`` (or ``make demo``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "examples" / "out" / "demo"
EXE = Path(sys.executable).with_name("weightsmith")
HIDDEN, INTER, LAYERS, VOCAB = 128, 352, 6, 512
ZOO_RUNS, ZOO_EPOCHS, METANET_EPOCHS = 40, 10, 12  # step 5: tiny runs (~7 s for the zoo on 2 cores), few epochs
MLP_WIDTH, MLP_EPOCHS = 128, 8  # step 4


def model(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
        }
    if base is None:
        return {k: (0.02 * torch.randn(s, generator=g)).bfloat16() for k, s in shapes.items()}
    return {k: (base[k].float() + 0.002 * torch.randn(s, generator=g)).bfloat16() for k, s in shapes.items()}


def save(folder: Path, sd: dict[str, torch.Tensor], shards: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per : (i + 1) * per]
        save_file({k: sd[k].contiguous() for k in part}, folder / fname)
        weight_map |= {k: fname for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": HIDDEN,
                "intermediate_size": INTER,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": 4,
                "vocab_size": VOCAB,
                "torch_dtype": "bfloat16",
            },
            indent=2,
        )
    )
    return folder


def run(*args: str, cwd: Path | None = None, timeout: float = 300) -> str:
    """``weightsmith ARGS`` in a subprocess (bounded); its stdout."""
    print("$ weightsmith " + " ".join(args), flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    p = subprocess.run([str(EXE), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"weightsmith {args[0]} exited with {p.returncode}:\n{p.stderr}")
    return p.stdout


def load(folder: Path) -> dict[str, torch.Tensor]:
    from merge.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    return {k: ckpt[k] for k in ckpt.keys()}


def same_tensors(a: Path, b: Path) -> bool:
    sa, sb = load(a), load(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def header(n: int, title: str) -> None:
    print(f"\n=== {n}. {title} " + "=" * max(3, 90 - len(title)), flush=True)


# -------------------------------------------------------------------------------------------------
# 0. merges with the CLI
# -------------------------------------------------------------------------------------------------


def step_merge(out: Path) -> dict[str, Any]:
    header(0, "merge LLaMA-shaped checkpoints with the CLI (TIES, SLERP)")
    base = model(0)
    save(out / "base", base)
    save(out / "ft_math", model(1, base))
    save(out / "ft_code", model(2, base))
    print(f"made 3 checkpoints ({LAYERS} layers, bf16, 2 shards each) in {out}")

    (out / "ties.yaml").write_text(f"""\
merge_method: ties
base_model: {out / "base"}
models:
  - model: {out / "ft_math"}
    parameters: {{weight: 1.0, density: [0.3, 0.7]}}   # density grows with depth
  - model: {out / "ft_code"}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: bfloat16
""")
    ties = json.loads(run("merge", str(out / "ties.yaml"), "-o", str(out / "merged_ties"), "--json"))
    print(f"  -> {ties['n_tensors']} tensors, {ties['bytes_written'] / 1e6:.1f} MB, {ties['seconds']:.2f} s")

    (out / "slerp.yaml").write_text(f"""\
slices:
  - sources:
      - model: {out / "ft_math"}
        layer_range: [0, {LAYERS}]
      - model: {out / "ft_code"}
        layer_range: [0, {LAYERS}]
merge_method: slerp
base_model: {out / "ft_math"}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""")
    slerp = json.loads(run("merge", str(out / "slerp.yaml"), "-o", str(out / "merged_slerp"), "--json"))
    print(f"  -> {slerp['n_tensors']} tensors in {slerp['seconds']:.2f} s")

    # one tensor against a direct call of the method on the inputs (float32 compute, bf16 out)
    from merge.checkpoint import open_checkpoint
    from merge.methods import get_method

    name = "model.layers.0.mlp.up_proj.weight"
    ins = [open_checkpoint(out / m) for m in ("base", "ft_math", "ft_code")]
    expected = get_method("ties")(
        [ins[1][name].float(), ins[2][name].float()],
        ins[0][name].float(),
        weight=[1.0, 0.5],
        density=[0.3, 0.5],
        normalize=True,
    )
    same = torch.equal(open_checkpoint(out / "merged_ties")[name], expected.bfloat16())
    print(f"check: '{name}' (layer 0: math density 0.3) equals a direct TIES call: {same}")
    card = (out / "merged_ties" / "README.md").read_text().splitlines()
    print(f"model card: {out / 'merged_ties' / 'README.md'} ({len(card)} lines)")
    if not same:
        raise RuntimeError("the TIES merge differs from a direct call of the method")
    return {
        "ties_tensors": ties["n_tensors"],
        "ties_mb": ties["bytes_written"] / 1e6,
        "slerp_tensors": slerp["n_tensors"],
        "ties_equals_direct_call": same,
    }


# -------------------------------------------------------------------------------------------------
# 1. the gRPC service
# -------------------------------------------------------------------------------------------------


def start_server(out: Path, token: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``weightsmith serve`` on 127.0.0.1, a free port, root ``out``; returns at once (see wait_port)."""
    port_file, log_path = out / "server.port", out / "server.log"
    port_file.unlink(missing_ok=True)
    # --slow-down (a hidden flag for demos and tests): progress slow enough to watch
    cmd = [str(EXE), "serve", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
           "--root", str(out), "--data-dir", str(out / "server-data"), "--max-running", "1", "--job-workers", "1",
           "--shutdown-grace", "5", "--slow-down", "0.02"]  # fmt: skip
    env = {**os.environ, "WEIGHTSMITH_TOKEN": token, "PYTHONPATH": str(ROOT)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=log)
    return proc, port_file, log_path


def wait_port(proc: subprocess.Popen[bytes], port_file: Path, log_path: Path, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not start in {timeout:.0f} s (log: {log_path})")
        time.sleep(0.05)
    return int(port_file.read_text())


def stop_server(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def step_grpc(out: Path, target: str, token: str) -> dict[str, Any]:
    from merge.execute import run_merge
    from service.client import Client, state_name

    header(1, f"a merge job over gRPC ({target})")
    recipe = out / "grpc_recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(out / "base"),
                "dtype": "bfloat16",
                "models": [
                    {"model": str(out / "ft_math"), "parameters": {"weight": 0.7}},
                    {"model": str(out / "ft_code"), "parameters": {"weight": 0.5}},
                ],
            },
            sort_keys=False,
        )
    )
    with Client(target, token=token, timeout=30) as c:
        c.wait_ready(timeout=60)
        resp = c.create_merge_job(recipe.read_text(), output_path="grpc_merge")
        print(f"submitted {resp.job.name}: {resp.plan.method}, {resp.plan.tensors_total} tensors")
        events: list[tuple[int, str, str, int, int]] = []
        line = ""
        for ev in c.watch(resp.job.name, timeout=120):
            p, state = ev.job.progress, state_name(ev.job.state)
            events.append((ev.sequence, state, p.phase, p.tensors_done, p.tensors_total))
            head = f"  {state:<9} {p.phase:<10}"
            if not line.startswith(head):  # one line per state/phase, progress appended to it
                if line:
                    print(line, flush=True)
                line = head
            line += f" {p.tensors_done}/{p.tensors_total}" if p.tensors_total else ""
        print(line)
        job = c.get_job(resp.job.name)
        result = c.job_result(job)
    state = state_name(job.state)
    print(
        f"{len(events)} events; job {state}: {result.tensors_total} tensors, "
        f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.2f} s -> {result.output_path}"
    )
    run_merge(recipe, out / "library_merge", progress=lambda _p: None)
    equal = state == "SUCCEEDED" and same_tensors(out / "grpc_merge", out / "library_merge")
    print(f"check: every tensor equals the library merge (merge.execute.run_merge): {equal}")
    return {
        "state": state,
        "events": len(events),
        "tensors": int(result.tensors_total),
        "progress": [e[3] for e in events],
        "equals_library": equal,
    }


# -------------------------------------------------------------------------------------------------
# 2. merge by Hub id at a pinned commit
# -------------------------------------------------------------------------------------------------


def step_hub(out: Path) -> dict[str, Any]:
    from merge.execute import run_merge
    from testkit.hub_server import HubServer

    hub_dir = out / "hub"
    hub = HubServer().start()
    try:
        header(2, f"merge by Hub id at a pinned revision (local Hub server {hub.url})")
        base, math_v1 = load(out / "base"), load(out / "ft_math")
        base_sha = hub.publish_model("hub-demo/base", base, hub_dir / "src-base")
        v1 = hub.publish_model("hub-demo/math", math_v1, hub_dir / "src-math-v1", message="v1")
        v2 = hub.publish_model("hub-demo/math", model(3, base), hub_dir / "src-math-v2", message="v2")
        print(f"published hub-demo/base@{base_sha[:8]}, hub-demo/math@{v1[:8]} (v1), then v2: main = {v2[:8]}")
        recipe = hub_dir / "recipe.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "linear",
                    "dtype": "bfloat16",
                    "models": [
                        {"model": "hub-demo/base", "parameters": {"weight": 0.25}},
                        {"model": f"hub-demo/math@{v1}", "parameters": {"weight": 0.75}},
                    ],
                },
                sort_keys=False,
            )
        )
        summary = json.loads(
            run(
                "merge",
                str(recipe),
                "-o",
                str(out / "hub_merge"),
                "--endpoint",
                hub.url,
                "--cache-dir",
                str(hub_dir / "cache"),
                "--json",
                cwd=hub_dir,
            )
        )
        downloads = len(hub.downloaded_files())
    finally:
        hub.stop()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "hub_merge" / "README.md").data.to_dict()["weightsmith"]["models"]
    recorded = {m["repo_id"]: m["commit"] for m in summary["models"]}
    print(
        f"  -> {summary['n_tensors']} tensors, {downloads} files downloaded; the model card records "
        + ", ".join(f"{m['repo_id']} (revision {m['revision'][:8]}) = commit {m['commit'][:8]}" for m in card)
    )
    # the same merge of the local folders (v1 = ft_math): the pinned commit's weights were used, not main's
    (out / "hub_local.yaml").write_text(
        recipe.read_text()
        .replace("hub-demo/base", str(out / "base"))
        .replace(f"hub-demo/math@{v1}", str(out / "ft_math"))
    )
    run_merge(out / "hub_local.yaml", out / "hub_local_merge", progress=lambda _p: None)
    equal = same_tensors(out / "hub_merge", out / "hub_local_merge")
    print(
        f"check: recorded commit of hub-demo/math is the pinned v1 ({recorded.get('hub-demo/math') == v1}), "
        f"not main ({v2[:8]}); weights equal the local merge of v1: {equal}"
    )
    return {
        "pinned": v1,
        "main": v2,
        "recorded_commit": recorded.get("hub-demo/math"),
        "card_commits": [m["commit"] for m in card],
        "downloads": downloads,
        "equals_local_v1": equal,
    }


# -------------------------------------------------------------------------------------------------
# 3. lineage
# -------------------------------------------------------------------------------------------------


def step_lineage(out: Path) -> dict[str, Any]:
    from metanets.lineage import detect_lineage

    header(3, "lineage: which model did this one come from?")
    # "someone" fine-tuned our TIES merge: a low-rank update (rank 4) of every matrix
    g = torch.Generator().manual_seed(7)
    child = {}
    for k, v in load(out / "merged_ties").items():
        if v.dim() == 2:
            u, w = torch.randn(v.shape[0], 4, generator=g), torch.randn(4, v.shape[1], generator=g)
            v = (v.float() + 0.001 * (u @ w)).bfloat16()
        child[k] = v
    save(out / "mystery_finetune", child)
    names = ["base", "ft_math", "ft_code", "merged_ties", "merged_slerp", "grpc_merge", "hub_merge"]
    candidates = {n: out / n for n in names if (out / n).exists()}
    candidates["unrelated"] = save(out / "unrelated", model(99))
    r = detect_lineage(
        out / "mystery_finetune", candidates, child_name="mystery_finetune", max_family=len(candidates)
    )  # every related candidate in the tree
    for line in r.summary():
        print("  " + line)
    tree_png = r.render_tree(out / "lineage_tree.png", overwrite=True)
    r.render_tree(out / "lineage_tree.svg", overwrite=True)
    (out / "lineage.json").write_text(json.dumps(r.to_json(layers=False), indent=1, default=str))
    print(f"tree: {tree_png} (+ .svg)")
    return {
        "parent": r.parent,
        "true_parent": "merged_ties",
        "chain": list(r.chain),
        "scores": {c.name: c.score for c in r.candidates},
        "tree": str(tree_png),
    }


# -------------------------------------------------------------------------------------------------
# 4. Git Re-Basin
# -------------------------------------------------------------------------------------------------


def step_rebasin(out: Path) -> dict[str, Any]:
    from examples.rebasin_digits import batches, load_data, make_mlp, plot, train
    from merge.rebasin.api import rebasin
    from merge.rebasin.evaluation import evaluate, loss_barrier

    header(4, f"Git Re-Basin: two MLPs 64-{MLP_WIDTH}-{MLP_WIDTH}-10 on digits, {MLP_EPOCHS} epochs each")
    xtr, ytr, xte, yte = load_data(0)
    ma = train(make_mlp(MLP_WIDTH, 2, seed=0), xtr, ytr, epochs=MLP_EPOCHS, seed=0)
    mb = train(make_mlp(MLP_WIDTH, 2, seed=1), xtr, ytr, epochs=MLP_EPOCHS, seed=1)
    a = {k: v.detach().clone() for k, v in ma.state_dict().items()}
    b = {k: v.detach().clone() for k, v in mb.state_dict().items()}
    test = batches(xte, yte, 360)

    def model_fn(state: dict[str, torch.Tensor]) -> torch.nn.Module:
        m = make_mlp(MLP_WIDTH, 2)
        m.load_state_dict(state)
        return m.eval()

    t0 = time.perf_counter()
    aligned = rebasin(a, b, architecture="mlp", method="weight", seed=0)
    t_match = time.perf_counter() - t0
    with torch.no_grad():
        drift = float((model_fn(aligned.state)(xte) - mb(xte)).abs().max())
    naive = loss_barrier(model_fn, a, b, test, 25)
    after = loss_barrier(model_fn, a, aligned.state, test, 25)
    acc = [evaluate(m, test)[1] for m in (ma, mb)]
    mid = len(naive.lambdas) // 2
    print(
        f"test accuracy A {acc[0]:.3f}, B {acc[1]:.3f}; weight matching {t_match:.2f} s, "
        f"{aligned.result.iterations} iterations; max|f(B) - f(π(B))| = {drift:.1e}"
    )
    print(
        f"loss barrier (test): naive {naive.barrier:.3f} -> aligned {after.barrier:.3f}; "
        f"mid-point accuracy {naive.accuracies[mid]:.3f} -> {after.accuracies[mid]:.3f}"
    )
    plot(
        [
            {
                "width": MLP_WIDTH,
                "lambdas": naive.lambdas,
                "naive": {"test_losses": naive.losses},
                "weight_matching": {"test_losses": after.losses},
            }
        ],
        out / "rebasin.png",
    )
    (out / "rebasin.json").write_text(json.dumps({"naive": naive.to_dict(), "weight_matching": after.to_dict()}))
    print(f"plot: {out / 'rebasin.png'}")
    return {
        "barrier_before": naive.barrier,
        "barrier_after": after.barrier,
        "function_drift": drift,
        "mid_acc_before": naive.accuracies[mid],
        "mid_acc_after": after.accuracies[mid],
        "endpoint_acc": acc,
    }


# -------------------------------------------------------------------------------------------------
# 5. metanet: predict accuracy from weights
# -------------------------------------------------------------------------------------------------


def step_metanet(out: Path) -> dict[str, Any]:
    from examples.predict_accuracy import build, figure, train_one, zoo_a
    from metanets.train import predict
    from metanets.zoo import Zoo

    header(5, f"metanet: a zoo of {ZOO_RUNS} digits MLP runs, a GMN predicting their test accuracy")
    cfg = {
        **zoo_a(ZOO_RUNS, seed=5),
        "name": "zoo",
        "checkpoints": [0, 1, 2, 5, ZOO_EPOCHS],
        "hparams": {"epochs": {"int": [2, ZOO_EPOCHS]}},
    }
    zoo_path = build(cfg, out, workers=2)
    r = train_one(zoo_path, "gmn", "test_acc", 1.0, epochs=METANET_EPOCHS, out=out / "metanet", patience=METANET_EPOCHS)
    metanet = next(p for p in (out / "metanet").iterdir() if p.is_dir())
    m = r["metrics"]
    print(
        f"GMN: {m['epochs_run']} epochs on {m['train_records']} checkpoints in {m['seconds']:.0f} s; "
        f"held-out runs: Kendall τ {m['kendall_tau']:.2f}, RMSE {m['rmse']:.3f} ({m['test_records']} checkpoints)"
    )
    # the trained metanet, used as a user would: predict() on checkpoints of runs it never saw
    zoo = Zoo(zoo_path)
    by_id = {rec["id"]: i for i, rec in enumerate(zoo.records)}
    test_ids = json.loads((metanet / "card.json").read_text())["test_predictions"]["ids"]
    idx = [by_id[t] for t in test_ids]
    preds = predict(metanet, [zoo.state_dict(i) for i in idx], spec=zoo.spec(idx[0]))
    truth = [float(zoo.records[i]["test_acc"]) for i in idx]
    values = [float(p["prediction"]) for p in preds]
    for t, i, v, y in list(zip(test_ids, idx, values, truth, strict=True))[:6]:
        print(f"  {t}: predicted {v:.3f}, true {y:.3f}  (epoch {zoo.records[i].get('epoch', '?')})")
    figure({"tables": {"T1": {"gmn@1.0": r}}}, out / "predict_accuracy.png")
    print(f"plot: {out / 'predict_accuracy.png'}")
    return {
        "zoo_models": len(zoo),
        "kendall_tau": m["kendall_tau"],
        "rmse": m["rmse"],
        "predictions": values,
        "truth": truth,
        "metanet": str(metanet),
    }


# -------------------------------------------------------------------------------------------------


def summarize(res: dict[str, Any], out: Path, seconds: float) -> list[str]:
    g, h, li, rb, mn = res["grpc"], res["hub"], res["lineage"], res["rebasin"], res["metanet"]
    return [
        f"0 merge (CLI)  TIES + SLERP of 3 LLaMA-shaped bf16 checkpoints: {res['merge']['ties_tensors']} tensors, "
        f"TIES tensor == direct call: {res['merge']['ties_equals_direct_call']}",
        f"1 gRPC         job {g['state']} after {g['events']} progress events ({g['tensors']} tensors); "
        f"output == library merge: {g['equals_library']}; server stopped (exit {res['server_exit_code']})",
        f"2 Hub          merged hub-demo/math@{h['pinned'][:8]} (main is {h['main'][:8]}); recorded commit "
        f"{(h['recorded_commit'] or '?')[:8]}, weights == v1: {h['equals_local_v1']}",
        f"3 lineage      parent of mystery_finetune: {li['parent']} (true: {li['true_parent']}), "
        f"score {li['scores'].get(li['parent'], float('nan')):.3f}",
        f"4 Re-Basin     loss barrier {rb['barrier_before']:.3f} -> {rb['barrier_after']:.3f} after weight matching",
        f"5 metanet      GMN on {mn['zoo_models']} zoo checkpoints: held-out Kendall τ {mn['kendall_tau']:.2f}, "
        f"{len(mn['predictions'])} predictions in [{min(mn['predictions']):.2f}, {max(mn['predictions']):.2f}]",
        f"outputs in {out}: lineage_tree.png/.svg, rebasin.png, predict_accuracy.png, summary.json; "
        f"merged models merged_ties/, merged_slerp/, grpc_merge/, hub_merge/ ({seconds:.0f} s in all)",
    ]


def main(out: Path | None = None) -> dict[str, Any]:
    """Run steps 0-5 into ``out`` (default ``examples/out/demo``; emptied first); the key results, with
    ``summary`` (the lines printed) and ``ok`` (every check held)."""
    out = Path(out or OUT).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    token = secrets.token_urlsafe(16)
    proc = None
    try:
        proc, port_file, log_path = start_server(out, token)  # starts while the CLI merges run
        res["merge"] = step_merge(out)
        port = wait_port(proc, port_file, log_path)
        res["grpc"] = step_grpc(out, f"127.0.0.1:{port}", token)
    finally:
        stop_server(proc)
    res["server_exit_code"] = proc.returncode if proc is not None else None
    res["hub"] = step_hub(out)
    res["lineage"] = step_lineage(out)
    res["rebasin"] = step_rebasin(out)
    res["metanet"] = step_metanet(out)
    res["seconds"] = time.perf_counter() - t0
    lines = summarize(res, out, res["seconds"])
    res["summary"] = lines
    (out / "summary.json").write_text(json.dumps(res, indent=1, default=str))
    print("\n=== summary " + "=" * 90)
    print("\n".join(lines))
    ok = (
        res["grpc"]["equals_library"]
        and res["hub"]["equals_local_v1"]
        and res["lineage"]["parent"] == res["lineage"]["true_parent"]
        and res["rebasin"]["barrier_after"] < res["rebasin"]["barrier_before"]
        and all(math.isfinite(v) for v in res["metanet"]["predictions"])
    )
    if not ok:
        print("some check did not hold (see above)", file=sys.stderr)
    res["ok"] = ok
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
