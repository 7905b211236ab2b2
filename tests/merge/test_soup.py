"""The living soup folder (merge/soups/folder.py): exact add/remove, hashes, atomicity, diffusers folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge.checkpoint import CheckpointWriter, open_checkpoint
from merge.errors import (
    IntegrityError,
    MissingTensorError,
    ModelNotFoundError,
    NonFiniteError,
    OutputExistsError,
    ShapeMismatchError,
    SoupError,
)
from merge.soups.folder import Soup
from tests.conftest import llama_like, tree_digest, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def members(tmp_path: Path, n: int, dtype: torch.dtype = torch.float32, **kw) -> list[Path]:
    base = llama_like(0, **kw)
    return [
        write_checkpoint(tmp_path / f"m{i}", llama_like(i, base=base, dtype=dtype, **kw))
        for i in range(1, n + 1)
    ]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(folder)
    return {k: c[k] for k in c}


def assert_bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def soup_digest(soup: Path) -> str:
    """Everything in the soup folder but the (content-free) lock file."""
    return tree_digest(soup)


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------


def test_build_is_the_weighted_mean_in_float64(tmp_path: Path) -> None:
    ms = members(tmp_path, 3)
    w = [1.0, 2.0, 0.5]
    Soup.init(tmp_path / "soup", ms, weights=w).build(tmp_path / "out")
    got = tensors(tmp_path / "out")
    ins = [tensors(m) for m in ms]
    for k, v in got.items():
        acc = None
        for t, wi in zip(ins, w, strict=True):  # the documented arithmetic: Σ (θ_i·w_i) in order, / Σ w_i
            x = t[k].double() * wi
            acc = x if acc is None else acc + x
        assert torch.equal(v, (acc / sum(w)).float()), k
    # a linear merge in float32 (the engine) agrees to float32 rounding
    from merge.execute import run_merge

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": wi}} for m, wi in zip(ms, w, strict=True)],
    }
    run_merge(recipe, tmp_path / "lin")
    lin = tensors(tmp_path / "lin")
    for k in got:
        torch.testing.assert_close(got[k], lin[k], rtol=1e-6, atol=1e-7)
    info = json.loads((tmp_path / "out" / "weightsmith_soup.json").read_text())
    assert [m["weight"] for m in info["members"]] == w and info["total_weight"] == 3.5
    assert (tmp_path / "out" / "config.json").read_text() == (ms[0] / "config.json").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remove_gives_the_bits_of_the_soup_built_without_it(tmp_path: Path, dtype: torch.dtype) -> None:
    ms = members(tmp_path, 4, dtype=dtype)
    s = Soup.init(tmp_path / "soup", ms)
    s.remove("m2")
    s.build(tmp_path / "removed")
    Soup.init(tmp_path / "scratch", [ms[0], ms[2], ms[3]]).build(tmp_path / "scratch_out")
    assert_bits_equal(tensors(tmp_path / "removed"), tensors(tmp_path / "scratch_out"))
    assert (tmp_path / "removed" / "model.safetensors").read_bytes() == (
        tmp_path / "scratch_out" / "model.safetensors"
    ).read_bytes()
    assert tensors(tmp_path / "removed")["lm_head.weight"].dtype == dtype
    # the float64 running sums are identical too
    a = Soup(tmp_path / "soup").manifest["state"]
    b = Soup(tmp_path / "scratch").manifest["state"]
    assert a["files"] == b["files"]


def test_add_then_remove_restores_the_previous_soup_bit_for_bit(tmp_path: Path) -> None:
    ms = members(tmp_path, 4)
    s = Soup.init(tmp_path / "soup", ms[:3])
    before = s.manifest["state"]["files"]
    s.build(tmp_path / "before")
    s.add(ms[3], weight=3.0)
    s.build(tmp_path / "with")
    assert not torch.equal(
        tensors(tmp_path / "with")["lm_head.weight"], tensors(tmp_path / "before")["lm_head.weight"]
    )
    s.remove("m4")
    s.build(tmp_path / "after")
    assert (tmp_path / "after" / "model.safetensors").read_bytes() == (
        tmp_path / "before" / "model.safetensors"
    ).read_bytes()
    assert s.manifest["state"]["files"] == before
    ops = [(e["op"], e.get("member"), len(e["members"])) for e in s.manifest["history"]]
    assert ops == [("init", None, 3), ("add", "m4", 4), ("remove", "m4", 3)]
    assert s.manifest["history"][0]["soup_id"] == s.manifest["history"][-1]["soup_id"] == s.soup_id


def test_adding_one_by_one_equals_init_with_all(tmp_path: Path) -> None:
    ms = members(tmp_path, 4)
    s = Soup.init(tmp_path / "one", ms[:1])
    for m in ms[1:]:
        s.add(m, weight=0.7)
    t = Soup.init(tmp_path / "all", ms, weights=[1.0, 0.7, 0.7, 0.7])
    assert s.manifest["state"]["files"] == t.manifest["state"]["files"]
    s.build(tmp_path / "a")
    t.build(tmp_path / "b")
    assert_bits_equal(tensors(tmp_path / "a"), tensors(tmp_path / "b"))


def test_one_member_and_identical_members_are_copied_byte_for_byte(tmp_path: Path) -> None:
    ms = members(tmp_path, 1)
    s = Soup.init(tmp_path / "soup", ms)
    assert s.manifest["state"] is None  # nothing differs, nothing summed
    s.build(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (ms[0] / "model.safetensors").read_bytes()
    # a soup that loses all members but one is that member again
    extra = members(tmp_path / "x", 2)
    s.add(extra[1], id="other")
    s.remove("other")
    assert s.manifest["state"] is None and not any(
        p.name.startswith("state-") for p in (tmp_path / "soup").iterdir()
    )
    s.remove("m1")
    with pytest.raises(SoupError, match="no members"):
        s.build(tmp_path / "empty")
    s.add(ms[0])
    assert len(s.members) == 1


def test_non_float_tensors_and_sharded_members(tmp_path: Path) -> None:
    base = llama_like(0)
    paths = []
    for i in (1, 2):
        sd = llama_like(i, base=base) | {"model.pos_ids": torch.arange(7) + i}
        paths.append(write_checkpoint(tmp_path / f"m{i}", sd, shards=3))
    s = Soup.init(tmp_path / "soup", paths, dtype="bfloat16")
    s.build(tmp_path / "out", shard_size=4000)
    got = tensors(tmp_path / "out")
    assert torch.equal(got["model.pos_ids"], torch.arange(7) + 1)  # from the first member
    assert got["lm_head.weight"].dtype == torch.bfloat16
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    a, b = tensors(paths[0]), tensors(paths[1])
    exp = ((a["lm_head.weight"].double() + b["lm_head.weight"].double()) / 2).to(torch.bfloat16)
    assert torch.equal(got["lm_head.weight"], exp)


def test_single_file_members(tmp_path: Path) -> None:
    base = llama_like(0)
    files = []
    for i in (1, 2):
        f = tmp_path / f"f{i}.safetensors"
        save_file(llama_like(i, base=base), f)
        files.append(f)
    s = Soup.init(tmp_path / "soup", files)
    assert [m.id for m in s.members] == ["f1", "f2"]
    s.build(tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    a, b = load_file(files[0]), load_file(files[1])
    assert torch.equal(
        got["lm_head.weight"], ((a["lm_head.weight"].double() + b["lm_head.weight"].double()) / 2).float()
    )


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, soup unchanged
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def soup3(tmp_path: Path) -> tuple[Path, list[Path]]:
    ms = members(tmp_path, 3)
    Soup.init(tmp_path / "soup", ms)
    return tmp_path / "soup", ms


def test_bad_members_are_refused_and_the_soup_is_unchanged(
    tmp_path: Path, soup3: tuple[Path, list[Path]]
) -> None:
    soup, ms = soup3
    digest = soup_digest(soup)
    wide = write_checkpoint(tmp_path / "wide", llama_like(9, hidden=20))
    with pytest.raises(ShapeMismatchError, match=r"wide: tensor '.*' has shape \[.*\], expected"):
        Soup(soup).add(wide)
    other = write_checkpoint(tmp_path / "other", llama_like(9) | {"extra.weight": torch.ones(3)})
    with pytest.raises(MissingTensorError, match="tensor 'extra.weight' is not in member 'm1'"):
        Soup(soup).add(other)
    fewer = write_checkpoint(tmp_path / "fewer", llama_like(9, layers=2))
    with pytest.raises(MissingTensorError, match="tensor 'model.layers.2.* is missing"):
        Soup(soup).add(fewer)
    with pytest.raises(ModelNotFoundError, match="nowhere: no such file"):
        Soup(soup).add(tmp_path / "nowhere")
    with pytest.raises(SoupError, match="'m2' is already in the soup"):
        Soup(soup).add(ms[1])
    with pytest.raises(SoupError, match="weight must be a positive number"):
        Soup(soup).add(wide, id="w", weight=0.0)
    with pytest.raises(SoupError, match="'m9' is not a member of the soup \\(members: m1, m2, m3\\)"):
        Soup(soup).remove("m9")
    nan = llama_like(5)
    nan["lm_head.weight"][3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="tensor 'lm_head.weight' contains NaN.*'nan'"):
        Soup(soup).add(write_checkpoint(tmp_path / "nan", nan))
    pickle = tmp_path / "pickled"
    pickle.mkdir()
    torch.save(llama_like(1), pickle / "pytorch_model.bin")
    with pytest.raises(Exception, match="not in safetensors format|no checkpoint found"):
        Soup(soup).add(pickle)
    assert soup_digest(soup) == digest


def test_hashes_are_verified_before_members_are_read(tmp_path: Path, soup3: tuple[Path, list[Path]]) -> None:
    soup, ms = soup3
    digest = soup_digest(soup)
    f = ms[1] / "model.safetensors"
    original = f.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x01  # one bit of one weight, same size: the header check cannot see it
    f.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=r"soup member 'm2': .*m2/model.safetensors has changed since it was added"
    ):
        Soup(soup).remove("m3")  # re-sums m1 and m2
    assert soup_digest(soup) == digest
    info = Soup(soup).show(verify=True)
    assert [m["status"] == "ok" for m in info["members"]] == [True, False, True]
    f.write_bytes(original)
    # the first member's config is copied into every build: checked too
    (ms[0] / "config.json").write_text("{}")
    with pytest.raises(IntegrityError, match="m1/config.json has changed"):
        Soup(soup).build(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))
    # a member missing from disk
    os.rename(ms[2], tmp_path / "moved")
    with pytest.raises(ModelNotFoundError, match="soup member 'm3': .*m3 is missing from disk"):
        Soup(soup).remove("m1")
    # the soup's own running sum is hashed too
    state = soup / Soup(soup).manifest["state"]["dir"]
    shard = next(state.glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x10
    shard.write_bytes(bytes(raw))
    os.rename(tmp_path / "moved", ms[2])
    (ms[0] / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3})
    )
    with pytest.raises(IntegrityError, match="running sum has changed"):
        Soup(soup).build(tmp_path / "out")
    with pytest.raises(IntegrityError, match="running sum has changed"):
        Soup(soup).add(write_checkpoint(tmp_path / "m4", llama_like(4, base=llama_like(0))))


def test_injected_failures_leave_the_soup_as_it_was(
    tmp_path: Path, soup3: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    soup, ms = soup3
    new = write_checkpoint(tmp_path / "m4", llama_like(4, base=llama_like(0)))
    digest = soup_digest(soup)
    calls = {"n": 0}
    real = CheckpointWriter.write_rows

    def failing(self: CheckpointWriter, *a: object, **k: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        real(self, *a, **k)

    monkeypatch.setattr(CheckpointWriter, "write_rows", failing)
    with pytest.raises(OSError, match="No space left"):
        Soup(soup).add(new)
    assert soup_digest(soup) == digest
    calls["n"] = 0
    with pytest.raises(OSError, match="No space left"):
        Soup(soup).remove("m1")
    assert soup_digest(soup) == digest
    monkeypatch.setattr(CheckpointWriter, "write_rows", real)

    import merge.soups.folder as soup_mod

    def no_manifest(*a: object, **k: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(soup_mod, "_write_manifest", no_manifest)
    with pytest.raises(OSError, match="Input/output error"):
        Soup(soup).add(new)
    assert soup_digest(soup) == digest
    monkeypatch.undo()
    Soup(soup).add(new)  # and the soup still works
    assert [m.id for m in Soup(soup).members] == ["m1", "m2", "m3", "m4"]


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
from merge.soups.folder import Soup
soup, member, marker, at = sys.argv[1:5]
def progress(event, done, total):
    if event == at:
        Path(marker).write_text(event)
        time.sleep(60)
Soup(soup).add(member, progress=progress)
"""


@pytest.mark.parametrize("at", ["sum", "commit"])
def test_sigkill_in_the_middle_of_add(tmp_path: Path, soup3: tuple[Path, list[Path]], at: str) -> None:
    """Killed while writing the new running sum ("sum": after its first tensor) or with the new
    state complete but not committed ("commit"): the soup is as it was, and the next operation
    clears what the killed one left."""
    soup, ms = soup3
    new = write_checkpoint(tmp_path / "m4", llama_like(4, base=llama_like(0)))
    s = Soup(soup)
    s.build(tmp_path / "before")
    manifest = (soup / "soup.json").read_bytes()
    state_dir = soup / s.manifest["state"]["dir"]
    state = tree_digest(state_dir)
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(soup), str(new), str(marker), at], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert p.poll() is None, "the add finished or died before reaching the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert (soup / "soup.json").read_bytes() == manifest
    assert tree_digest(state_dir) == state
    info = Soup(soup).show()
    assert [m["id"] for m in info["members"]] == ["m1", "m2", "m3"]
    assert info["leftovers"], "the killed add left its partial state behind"
    Soup(soup).build(tmp_path / "after")
    assert (tmp_path / "after" / "model.safetensors").read_bytes() == (
        tmp_path / "before" / "model.safetensors"
    ).read_bytes()
    Soup(soup).add(new)
    assert not Soup(soup).show()["leftovers"]
    assert sorted(p.name for p in soup.iterdir() if not p.name.startswith(".")) == [
        "soup.json",
        Soup(soup).manifest["state"]["dir"],
    ]


def test_init_build_and_open_errors(tmp_path: Path) -> None:
    ms = members(tmp_path, 2)
    Soup.init(tmp_path / "soup", ms)
    with pytest.raises(OutputExistsError):
        Soup.init(tmp_path / "soup", ms)
    Soup(tmp_path / "soup").build(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="already exists .to replace it: overwrite, --overwrite"):
        Soup(tmp_path / "soup").build(tmp_path / "out")
    Soup(tmp_path / "soup").build(tmp_path / "out", overwrite=True)
    with pytest.raises(ModelNotFoundError, match="no such soup folder"):
        Soup(tmp_path / "nope")
    with pytest.raises(SoupError, match="not a soup folder"):
        Soup(ms[0])
    wide = write_checkpoint(tmp_path / "wide", llama_like(3, hidden=20))
    with pytest.raises(ShapeMismatchError):
        Soup.init(tmp_path / "bad", [ms[0], wide])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob("bad.partial-*"))
    with pytest.raises(ShapeMismatchError, match="as in the base"):
        Soup.init(tmp_path / "bad", [wide], base=ms[0])
    s = Soup.init(tmp_path / "based", [], base=ms[0])
    with pytest.raises(ShapeMismatchError, match="as in the base"):
        s.add(wide)
    s.add(ms[1])
    assert s.show()["base"]["path"] == str(ms[0].resolve())
    assert s.show(verify=True)["base"]["status"] == "ok"
    (ms[0] / "config.json").write_text("{}")
    assert "has changed" in s.show(verify=True)["base"]["status"]


# ---------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------


def _pipelines(
    tmp_path: Path, n: int, *, vae_differs_for: int | None = None, shard: bool = False
) -> list[Path]:
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    def unet(seed: int) -> UNet2DModel:
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=4,
            in_channels=2,
            out_channels=2,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )

    def vq(seed: int) -> VQModel:
        torch.manual_seed(seed)
        return VQModel(
            in_channels=1,
            out_channels=1,
            latent_channels=2,
            block_out_channels=(8,),
            norm_num_groups=4,
            num_vq_embeddings=16,
            vq_embed_dim=2,
        )

    out = []
    for i in range(n):
        pipe = LDMPipeline(
            vqvae=vq(100 if i != vae_differs_for else 101),
            unet=unet(i),
            scheduler=DDIMScheduler(num_train_timesteps=50),
        )
        pipe.save_pretrained(tmp_path / f"p{i}", max_shard_size="20KB" if shard else "10GB")
        out.append(tmp_path / f"p{i}")
    return out


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(folder / "unet").state_dict()


@pytest.mark.parametrize("shard", [False, True])
def test_diffusers_folder_soup_loads_back_through_diffusers(tmp_path: Path, shard: bool) -> None:
    from diffusers import DiffusionPipeline, LDMPipeline

    ps = _pipelines(tmp_path, 3, shard=shard)
    s = Soup.init(tmp_path / "soup", ps[:2])
    s.add(ps[2])
    info = s.build(tmp_path / "out", shard_size=20_000 if shard else 5 * 10**9)
    assert info["summed"] == ["unet"] and info["copied"] == ["vqvae"]
    out = tmp_path / "out"
    if shard:
        assert (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
        assert len(list((out / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
        assert (out / rel).read_bytes() == (ps[0] / rel).read_bytes(), rel
    assert tree_digest(out / "vqvae") == tree_digest(ps[0] / "vqvae")  # identical component: copied as is
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, LDMPipeline)
    got = pipe.unet.state_dict()
    ins = [_unet(p) for p in ps]
    for k, v in got.items():
        assert torch.equal(v, ((ins[0][k].double() + ins[1][k].double() + ins[2][k].double()) / 3).float()), k
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 4, 4, 1)


def test_diffusers_component_that_starts_to_differ_is_souped_then_copied_again(tmp_path: Path) -> None:
    from diffusers import VQModel

    ps = _pipelines(tmp_path, 3, vae_differs_for=2)
    s = Soup.init(tmp_path / "soup", ps[:2])
    assert s.manifest["state"]["summed"] == ["unet"]
    s.add(ps[2])  # its VQ-VAE differs: now summed (from scratch over all three), the UNet incrementally
    assert s.manifest["state"]["summed"] == ["unet", "vqvae"]
    s.build(tmp_path / "out")
    vq = [VQModel.from_pretrained(p / "vqvae").state_dict() for p in ps]
    got = VQModel.from_pretrained(tmp_path / "out" / "vqvae").state_dict()
    k = "encoder.conv_in.weight"
    assert torch.equal(got[k], ((vq[0][k].double() + vq[1][k].double() + vq[2][k].double()) / 3).float())
    Soup.init(tmp_path / "scratch", ps).build(tmp_path / "scratch_out")
    for comp in ("unet", "vqvae"):
        assert (tmp_path / "out" / comp / "diffusion_pytorch_model.safetensors").read_bytes() == (
            tmp_path / "scratch_out" / comp / "diffusion_pytorch_model.safetensors"
        ).read_bytes()
    s.remove("p2")
    assert s.manifest["state"]["summed"] == ["unet"]
    s.build(tmp_path / "back")
    assert tree_digest(tmp_path / "back" / "vqvae") == tree_digest(ps[0] / "vqvae")


def test_diffusers_members_must_have_the_same_components(tmp_path: Path) -> None:
    import shutil

    ps = _pipelines(tmp_path, 2)
    s = Soup.init(tmp_path / "soup", ps[:1])
    digest = soup_digest(tmp_path / "soup")
    shutil.copytree(ps[1], tmp_path / "novq")
    shutil.rmtree(tmp_path / "novq" / "vqvae")
    with pytest.raises(Exception, match="component 'vqvae' has no folder"):
        s.add(tmp_path / "novq")
    index = json.loads((tmp_path / "novq" / "model_index.json").read_text())
    del index["vqvae"]
    (tmp_path / "novq" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        Exception, match=r"weight components \['unet'\], expected \['unet', 'vqvae'\].*missing: vqvae"
    ):
        s.add(tmp_path / "novq")
    with pytest.raises(Exception, match="is a checkpoint folder, but member 'p0'"):
        s.add(write_checkpoint(tmp_path / "plain", llama_like(1)))
    assert soup_digest(tmp_path / "soup") == digest


@pytest.mark.parametrize("position", [0, 1, 2])
def test_build_verifies_every_member_and_names_the_changed_one(
    tmp_path: Path, soup3: tuple[Path, list[Path]], position: int
) -> None:
    """Whatever its position, a member whose weights changed after it was added fails the build,
    named (issue 22); an untouched soup builds without hashing members whose stamps are unchanged."""
    soup, ms = soup3
    Soup(soup).build(tmp_path / "ok")  # stamps unchanged: trusted
    f = ms[position] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight, same size
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"soup member 'm{position + 1}': .*model.safetensors has changed"):
        Soup(soup).build(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))
    data[-3] ^= 0x01  # restored bytes, new stamp: hashed again and accepted
    f.write_bytes(bytes(data))
    Soup(soup).build(tmp_path / "out")
    assert (tmp_path / "out" / ".weightsmith-output").is_file()
