"""Merge two models "from the Hub", pin them, reproduce the merge, push it back — in one script.

Nothing leaves this machine: the script starts the small Hub-compatible server the tests use
(``testkit/hub_server.py``) on 127.0.0.1, publishes three tiny LLaMA-shaped models to it (each repo
also carries a pickle copy of its weights, as many real repos do), and then drives the real
``weightsmith`` CLI and the real ``huggingface_hub`` client against it:

1. ``weightsmith merge`` of ``demo/math`` (a branch) and ``hf://demo/code@v1.0`` (a tag): only the
   files a merge needs are downloaded (no ``pytorch_model.bin``); the model card records the
   commits;
2. the same merge again: the cache is reused, no file is downloaded;
3. ``demo/math`` gets a new commit; the *pinned* recipe printed in the first card still rebuilds
   byte-identical shards, while the branch now gives a different merge;
4. ``--offline``: the pinned merge again with no request at all;
5. ``--push-to-hub`` with a token the server checks; the card is read back with
   ``huggingface_hub.ModelCard``;
6. an unknown revision: one line, exit code 2, no output.

Run: ``python examples/hub_merge.py`` (add ``--keep DIR`` to keep the outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from huggingface_hub import ModelCard  # noqa: E402

from service.cli.main import main as cli  # noqa: E402
from testkit.hub_server import HubServer  # noqa: E402

TOKEN = "hf_write_alice"  # the server's write token for user "alice"


def tiny_llama(seed: int, hidden: int = 64, layers: int = 4, vocab: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g) * 0.02,
            p + "mlp.up_proj.weight": torch.randn(4 * hidden, hidden, generator=g) * 0.02,
            p + "mlp.down_proj.weight": torch.randn(hidden, 4 * hidden, generator=g) * 0.02,
            p + "input_layernorm.weight": torch.ones(hidden),
        }
    return sd


def finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def publish(hub: HubServer, repo_id: str, sd: dict[str, torch.Tensor], work: Path) -> str:
    folder = work / "src" / repo_id.replace("/", "--")
    pickle_copy = folder.parent / f"{folder.name}.bin"
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, pickle_copy)
    return hub.publish_model(
        repo_id,
        sd,
        folder,
        extra={
            "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
            "generation_config.json": json.dumps({"max_new_tokens": 64}),
            "pytorch_model.bin": pickle_copy.read_bytes(),
            "README.md": f"# {repo_id}\n",
        },
    )


def run(*args: str) -> None:
    print("$ weightsmith " + " ".join(args))
    cli.main(args=list(args), standalone_mode=False)


def shards_digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("*.safetensors")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, help="keep the outputs in this folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="weightsmith-hub-"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "hf-cache"
    rows: list[tuple[str, int, int, int, str]] = []

    with HubServer() as hub:
        hub_opts = ["--endpoint", hub.url, "--cache-dir", str(cache)]
        base = tiny_llama(0)
        publish(hub, "demo/base", base, work)
        math_sha = publish(hub, "demo/math", finetune(base, 1), work)
        code_sha = publish(hub, "demo/code", finetune(base, 2), work)
        hub.tag("demo/code", "v1.0", code_sha)
        repo_bytes = sum(len(b) for r in ("demo/math", "demo/code") for b in hub.files(r).values())
        print(f"Hub server at {hub.url}: demo/math@{math_sha[:8]}, demo/code@v1.0={code_sha[:8]}\n")

        recipe = work / "recipe.yml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "linear",
                    "name": "math-code-soup",
                    "dtype": "float32",
                    "models": [
                        {"model": "demo/math", "parameters": {"weight": 0.5}},
                        {"model": "hf://demo/code@v1.0", "parameters": {"weight": 0.5}},
                    ],
                },
                sort_keys=False,
            )
        )

        def step(label: str, out: Path, *extra: str, recipe_path: Path = recipe) -> None:
            hub.clear_log()
            run("merge", str(recipe_path), "-o", str(out), *hub_opts, *extra)
            files = hub.downloaded_files()
            served = sum(
                len(hub.files(p.split("/resolve/")[0].strip("/"))[f])
                for p, f in zip(hub.downloads(), files, strict=True)
            )
            rows.append((label, len(hub.requests), len(files), served, shards_digest(out)))
            print()

        # 1. by branch and tag
        step("1 merge (branch + tag), cold cache", work / "merged")
        card = ModelCard.load(work / "merged" / "README.md")
        print("model card front matter:\n" + card.data.to_yaml() + "\n")
        # 2. warm cache
        step("2 same merge, warm cache", work / "merged-again")
        # 3. the branch moves; the pinned recipe from the card still reproduces the first merge
        publish(hub, "demo/math", finetune(base, 3), work)
        found = re.search(r"## Reproduce.*?```yaml\n(.*?)```", card.text, re.S)
        assert found is not None, "the model card has no pinned recipe"
        pinned_text = found.group(1)
        pinned = work / "pinned.yml"
        pinned.write_text(pinned_text)
        print("pinned recipe (from the model card):\n" + pinned_text)
        step("3a pinned recipe after demo/math moved", work / "reproduced", recipe_path=pinned)
        step("3b branch recipe after demo/math moved", work / "moved")
        # 4. offline
        step("4 pinned recipe, --offline", work / "offline", "--offline", recipe_path=pinned)
        # 5. push
        hub.clear_log()
        run(
            "merge",
            str(pinned),
            "-o",
            str(work / "to-push"),
            *hub_opts,
            "--push-to-hub",
            "alice/math-code-soup",
            "--token",
            TOKEN,
            "--json",
        )
        pushed = hub.repos["alice/math-code-soup"]
        back = ModelCard(hub.files("alice/math-code-soup")["README.md"].decode())
        print(
            f"\npushed: {len(hub.files('alice/math-code-soup')) - 1} files, "
            f"commit {pushed.branches['main'][:8]}; "
            f"card base_model read back from the Hub: {back.data.base_model}\n"
        )
        # 6. an error
        bad = work / "bad.yml"
        bad.write_text(recipe.read_text().replace("demo/math", "demo/math@no-such-branch"))
        try:
            run("merge", str(bad), "-o", str(work / "bad-out"), *hub_opts)
        except SystemExit as e:  # the CLI printed its one-line error on stderr
            print(f"exit code {e.code}; output written: {(work / 'bad-out').exists()}")
            assert e.code == 2 and not (work / "bad-out").exists()

    first = rows[0][4]
    print(f"\nall repo files of demo/math + demo/code: {repo_bytes:,} bytes")
    print(f"{'step':<42} {'requests':>8} {'files':>6} {'bytes downloaded':>17}  shards sha256  same as 1?")
    for label, nreq, nfiles, nbytes, digest in rows:
        print(
            f"{label:<42} {nreq:>8} {nfiles:>6} {nbytes:>17,}  {digest}  {'yes' if digest == first else 'no'}"
        )
    assert rows[1][2] == 0 and rows[2][4] == first and rows[3][4] != first and rows[4][1] == 0
    if args.keep:
        print(f"\noutputs in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
