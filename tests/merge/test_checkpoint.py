"""Checkpoint reading (lazy, pre-checked headers, confinement, pickles) and atomic sharded writing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge.atomic import MARKER
from merge.checkpoint import (
    CheckpointWriter,
    OutputTensor,
    open_checkpoint,
    parse_size,
    read_safetensors_header,
)
from merge.errors import (
    CheckpointError,
    MissingTensorError,
    ModelNotFoundError,
    OutputExistsError,
    PickleRefusedError,
)


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_single_file_folder_and_sharded_read_the_same(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.randn(4, 3) for i in range(5)} | {"ids": torch.arange(7)}
    save_file(sd, tmp_path / "one.safetensors")
    (tmp_path / "folder").mkdir()
    save_file(sd, tmp_path / "folder" / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({k: sd[k] for k in ["w0", "w1", "w2"]}, sharded / "a.safetensors")
    save_file({k: sd[k] for k in ["w3", "w4", "ids"]}, sharded / "b.safetensors")
    wm = {"w0": "a.safetensors", "w1": "a.safetensors", "w2": "a.safetensors", "w3": "b.safetensors",
          "w4": "b.safetensors", "ids": "b.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    for p in (tmp_path / "one.safetensors", tmp_path / "folder", sharded):
        c = open_checkpoint(p)
        assert set(c) == set(sd) and len(c) == 6
        for k, v in sd.items():
            assert torch.equal(c[k], v)
            assert c.shape(k) == tuple(v.shape) and c.dtype(k) == v.dtype
        assert torch.equal(c.rows("w3", 1, 3), sd["w3"][1:3])
    assert len(open_checkpoint(sharded).files) == 2


def test_missing_tensor_and_missing_model(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "m.safetensors")
    with pytest.raises(MissingTensorError, match="no tensor named 'b'"):
        open_checkpoint(tmp_path / "m.safetensors")["b"]
    with pytest.raises(ModelNotFoundError, match="nope"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no checkpoint found"):
        open_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 7, "cover 8 bytes|truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "trailing"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlap"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "needs dtype, shape and data_offsets"),
    ],
)
def test_header_prechecks(tmp_path: Path, header: dict, data: bytes, match: str) -> None:
    p = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match) as e:
        open_checkpoint(p)
    assert "bad.safetensors" in str(e.value)


def test_header_duplicate_keys_caps_and_garbage(tmp_path: Path) -> None:
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},' \
          b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    p = tmp_path / "dup.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        open_checkpoint(p)
    p = tmp_path / "bomb.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        open_checkpoint(p)
    p = tmp_path / "junk.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(CheckpointError, match="malformed safetensors header"):
        open_checkpoint(p)
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="shorter than 8 bytes"):
        open_checkpoint(p)
    save_file({f"t{i}": torch.zeros(1) for i in range(5)}, tmp_path / "many.safetensors")
    with pytest.raises(CheckpointError, match="more than the cap of 3"):
        read_safetensors_header(tmp_path / "many.safetensors", max_tensors=3)
    with pytest.raises(CheckpointError, match="cap"):
        read_safetensors_header(tmp_path / "many.safetensors", max_header_bytes=16)


def test_shard_paths_are_confined(tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    save_file({"a": torch.zeros(1)}, outside)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder"):
        open_checkpoint(ck)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": str(outside)}}))
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder"):
        open_checkpoint(ck)
    (ck / "link.safetensors").symlink_to(outside)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "link.safetensors"}}))
    with pytest.raises(CheckpointError, match="escapes the checkpoint folder"):
        open_checkpoint(ck)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard gone.safetensors is missing"):
        open_checkpoint(ck)
    (ck / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed index"):
        open_checkpoint(ck)


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (print, ("pwned",))


def test_pickles_refused_unless_allowed_and_then_weights_only(tmp_path: Path) -> None:
    sd = {"w": torch.randn(3, 2)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError):
        open_checkpoint(tmp_path)
    c = open_checkpoint(tmp_path / "pytorch_model.bin", allow_pickle=True)
    assert torch.equal(c["w"], sd["w"]) and c.shape("w") == (3, 2)
    evil = tmp_path / "evil" / "model.pt"
    evil.parent.mkdir()
    torch.save({"w": torch.zeros(1), "x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="cannot load pickle checkpoint safely"):
        open_checkpoint(evil, allow_pickle=True)


def test_writer_shards_index_and_roundtrip(tmp_path: Path) -> None:
    sd = {f"t{i}": torch.randn(10, 4).to(torch.bfloat16) for i in range(6)} | {"s": torch.tensor(3.0)}
    outs = [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with CheckpointWriter(tmp_path / "out", outs, shard_size=200) as w:
        for k, v in reversed(sd.items()):  # any order
            if v.dim():
                w.write_rows(k, 0, 4, v[:4])
                w.write_rows(k, 4, 10, v[4:])
            else:
                w.write(k, v)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"  # 2 x 80 B per 200 B shard
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    loaded = {}
    for f in shards:  # the real safetensors loader accepts every shard
        loaded |= load_file(tmp_path / "out" / f)
        assert (tmp_path / "out" / f).stat().st_size <= 200 + 400  # header + at most 200 B of data
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert set(index["weight_map"]) == set(sd)
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]


def test_writer_is_atomic_and_respects_existing_output(tmp_path: Path) -> None:
    outs = [OutputTensor("a", (4,), torch.float32)]
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", outs) as w:
            w.write("a", torch.zeros(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither output nor partial folder
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        CheckpointWriter(tmp_path / "out", outs)
    # a folder weightsmith did not write is never replaced, even with overwrite (issue 22)
    with pytest.raises(OutputExistsError, match="not a previous weightsmith output"):
        CheckpointWriter(tmp_path / "out", outs, overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    (tmp_path / "out" / "keep.txt").unlink()
    with CheckpointWriter(tmp_path / "out", outs, overwrite=True) as w:  # an empty folder: nothing to lose
        w.write("a", torch.zeros(4))
    with CheckpointWriter(tmp_path / "out", outs, overwrite=True) as w:  # a previous output: replaced
        w.write("a", torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "model.safetensors"]
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["a"], torch.ones(4))


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500M") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError, match="bad size"):
        parse_size("five")
