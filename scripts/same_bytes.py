"""Same bytes before and after a refactor: run a fixed set of operations, print the sha256 of each output.

Every registered per-tensor merge method (mergekit's recipes from bench/parity_mergekit.py, plus
passthrough and sparse_soup) and Git Re-Basin (``architecture: transformer``) on the tiny bench models
(``bench/make_models.py --size tiny --dtype float32``), a soup build, an adapter extract + fold, an
alignment (``rebasin``) of two zoo MLPs, a zoo of 4 runs and a GMN metanet trained 2 epochs on it.
Outputs are hashed file by file (name + bytes, sorted) except the files named in ``VOLATILE``
(timings). Data-driven methods (adamerging, concrete_*) need a user entry point and are covered by
their tests instead.

    python scripts/same_bytes.py -o before.json        # on the old layout
    python scripts/same_bytes.py -o after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))  # after the packages: bench/metanets.py is a script, not the package

#: files whose content carries a time or a duration (not compared)
VOLATILE = {"card.json", "README.md", "weightsmith_adapter.json", "zoo.json"}

ZOO = {
    "name": "same-bytes",
    "seed": 3,
    "runs": 4,
    "checkpoints": [0, 1],
    "tasks": ["digits"],
    "architectures": [{"kind": "mlp", "depth": 1, "width": 16, "activation": "relu", "norm": "none"}],
    "hparams": {"epochs": {"int": [1, 2]}, "train_fraction": {"uniform": [0.1, 0.3]}},
}


def tree_sha(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.name in VOLATILE:
            continue
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def run(work: Path, only: set[str] | None) -> dict[str, str]:
    import torch
    import yaml

    from merge.execute import run_merge
    from merge.lora.algebra import extract_adapter, fold_adapters
    from merge.plan import MergeOptions
    from merge.rebasin.api import rebasin
    from merge.soups.folder import Soup
    from metanets.train import TrainConfig, train_metanet
    from metanets.zoo import Zoo, build_zoo

    # the bench helpers last: they put bench/ first on sys.path (bench/metanets.py would shadow the package)
    from make_models import ensure_models  # isort: skip
    from parity_mergekit import EXTRA_METHODS, METHODS, recipe_for  # isort: skip

    torch.set_num_threads(1)
    out: dict[str, str] = {}

    def want(key: str) -> bool:
        return only is None or any(key.startswith(o) for o in only)

    def record(key: str, path: Path, t0: float) -> None:
        out[key] = tree_sha(path)
        print(f"{key:<28} {out[key][:16]}  {time.perf_counter() - t0:6.1f} s", flush=True)

    m = ensure_models("tiny", dtype="float32", n_ft=3)
    opts = MergeOptions(workers=1)
    recipes: dict[str, dict[str, Any]] = {k: recipe_for(k, m, "float32") for k in [*METHODS, *EXTRA_METHODS]}
    b, f1, f2, f3 = (str(m[k]) for k in ("base", "ft1", "ft2", "ft3"))
    recipes["passthrough"] = {"merge_method": "passthrough", "models": [{"model": f2}], "dtype": "bfloat16"}
    recipes["sparse_soup"] = {"merge_method": "sparse_soup", "models": [{"model": f} for f in (f1, f2, f3)]}
    recipes["git_rebasin"] = {
        "merge_method": "git_rebasin",
        "models": [{"model": f1}, {"model": f2}],
        "parameters": {"architecture": "transformer", "n_heads": 4, "max_iter": 5},
    }
    for key, recipe in recipes.items():
        if want(f"merge:{key}"):
            t0 = time.perf_counter()
            dest = work / "merge" / key.replace(":", "_")
            run_merge(recipe, dest, opts)
            record(f"merge:{key}", dest, t0)

    if want("soup"):
        t0 = time.perf_counter()
        soup = Soup.init(work / "soup", [f1, f2, f3], weights=[1.0, 2.0, 0.5])
        soup.build(work / "soup-built")
        record("soup build", work / "soup-built", t0)
    if want("adapter"):
        t0 = time.perf_counter()
        ad = extract_adapter(b, f1, work / "adapter", rank=4)
        record("adapter extract", Path(ad.out), t0)
        t0 = time.perf_counter()
        fold_adapters(b, [str(ad.out)], work / "folded", weights=[0.5], options=opts)
        record("adapter fold", work / "folded", t0)
    if want("zoo") or want("align") or want("metanet"):
        t0 = time.perf_counter()
        zoo_dir = work / "zoo"
        build_zoo(ZOO, zoo_dir, workers=1, progress=False)
        record("zoo (4 runs)", zoo_dir, t0)
        zoo = Zoo(zoo_dir)
        t0 = time.perf_counter()
        al = rebasin(zoo.state_dict(0), zoo.state_dict(2), architecture="mlp", seed=0)
        path = work / "aligned.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in al.state.items()}, str(path))
        record("align (mlp)", path, t0)
        t0 = time.perf_counter()
        cfg = TrainConfig(model="gmn", epochs=2, batch_size=4, split=(0.5, 0.25, 0.25),
                          model_args={"hidden": 8, "layers": 1})  # fmt: skip
        r = train_metanet(zoo, cfg, work / "metanet", progress=False)
        record("metanet (gmn, 2 epochs)", r.path, t0)
    (work / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, required=True, help="JSON of {operation: sha256}")
    ap.add_argument("--compare", type=Path, help="a previous JSON: print the agreement, exit 1 on a difference")
    ap.add_argument("--only", nargs="*", help="operation prefixes (merge:ties, soup, adapter, zoo...)")
    args = ap.parse_args(argv)
    work = REPO / "bench" / "out" / "same-bytes"  # one fixed place: outputs that record paths stay equal
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        hashes = run(work, set(args.only) if args.only else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        keys = sorted(set(before) | set(hashes))
        same = [k for k in keys if before.get(k) == hashes.get(k)]
        print(f"\n{len(same)}/{len(keys)} outputs byte-identical")
        for k in keys:
            if before.get(k) != hashes.get(k):
                print(f"  DIFFERENT {k}: {str(before.get(k))[:16]} -> {str(hashes.get(k))[:16]}")
        return 0 if len(same) == len(keys) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
