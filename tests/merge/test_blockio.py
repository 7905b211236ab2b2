"""The staged direct-I/O output files behind CheckpointWriter (merge/blockio.py)."""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest
import safetensors.torch
import torch

from merge import blockio
from merge.blockio import BlockSink
from merge.checkpoint import CheckpointWriter, OutputTensor


def _pieces(data: bytes, rng: random.Random) -> list[tuple[int, bytes]]:
    """``data`` cut at random points, in a random order."""
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(40))})
    parts = [(a, data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    rng.shuffle(parts)
    return parts


@pytest.mark.parametrize("direct", [True, False])
def test_any_order_any_cut_gives_the_exact_bytes(tmp_path, direct):
    rng = random.Random(0)
    sizes = [3 * 4096 * 3 + 17, 5, 4096 * 2]  # partial tail block, tiny file, exact blocks
    datas = [os.urandom(s) for s in sizes]
    paths = [tmp_path / f"f{i}" for i in range(3)]
    sink = BlockSink(paths, sizes, direct=direct, block_size=3 * 4096, io_threads=2, queue_depth=1)
    jobs = [(i, off, chunk) for i, d in enumerate(datas) for off, chunk in _pieces(d, rng)]
    rng.shuffle(jobs)

    def worker(k: int) -> None:
        for i, off, chunk in jobs[k::3]:
            sink.write(i, off, torch.frombuffer(bytearray(chunk), dtype=torch.uint8))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.finish()
    for p, d in zip(paths, datas, strict=True):
        assert p.read_bytes() == d  # truncated to size: no direct-I/O padding left


def test_typed_tensors_are_written_as_raw_bytes(tmp_path):
    x = torch.randn(7, 5).to(torch.bfloat16)
    sink = BlockSink([tmp_path / "f"], [x.numel() * 2], block_size=4096)
    sink.write(0, 0, x[:3])
    sink.write(0, 3 * 5 * 2, x[3:])
    sink.finish()
    assert (tmp_path / "f").read_bytes() == x.view(torch.uint8).numpy().tobytes()


def test_missing_bytes_are_an_error_not_a_hole(tmp_path):
    sink = BlockSink([tmp_path / "f"], [10_000], block_size=4096)
    sink.write(0, 0, b"a" * 9_000)
    with pytest.raises(RuntimeError, match=r"output incomplete, 1000 of its 10000 bytes were never written"):
        sink.finish()


def test_bytes_written_twice_are_an_error(tmp_path):
    sink = BlockSink([tmp_path / "f"], [100], block_size=4096)
    sink.write(0, 0, b"a" * 60)
    with pytest.raises(RuntimeError, match="written more than once"):
        sink.write(0, 50, b"b" * 50)
    sink.abort()


def test_overrun_is_refused(tmp_path):
    sink = BlockSink([tmp_path / "f"], [100], block_size=4096)
    with pytest.raises(RuntimeError, match=r"f: write of 20 bytes at offset 90 overruns the file's 100 bytes"):
        sink.write(0, 90, b"x" * 20)
    sink.abort()


def test_disk_error_reaches_the_writer_and_names_the_file(tmp_path, monkeypatch):
    real = os.pwrite

    def full(fd, data, off):
        if off >= 8192:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(blockio.os, "pwrite", full)
    sink = BlockSink([tmp_path / "f"], [5 * 4096], block_size=4096, queue_depth=1, io_threads=1)
    with pytest.raises(OSError, match=r"f: write failed: No space left on device"):
        for k in range(5):
            sink.write(0, k * 4096, b"z" * 4096)
        sink.finish()
    sink.abort()


def test_falls_back_to_buffered_writes_where_direct_io_is_refused(tmp_path, monkeypatch):
    real = os.pwrite
    calls = {"direct": 0}

    def picky(fd, data, off):
        if fcntl_direct(fd):
            calls["direct"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, off)

    def fcntl_direct(fd: int) -> bool:
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    monkeypatch.setattr(blockio.os, "pwrite", picky)
    data = os.urandom(64 * 4096 + 5)  # many blocks: both I/O threads meet the refusal
    sink = BlockSink([tmp_path / "f"], [len(data)], block_size=4096)
    sink.write(0, 0, data)
    sink.finish()
    assert (tmp_path / "f").read_bytes() == data
    if getattr(os, "O_DIRECT", 0) and calls["direct"]:  # the file system took O_DIRECT, the "device" did not
        assert 1 <= calls["direct"] <= 2 and not sink.direct  # one refused write per I/O thread at most


def test_checkpoint_writer_output_equals_safetensors_save_file(tmp_path):
    torch.manual_seed(0)
    ts = {
        "a.weight": torch.randn(33, 17),
        "b.bias": torch.randn(5).to(torch.bfloat16),
        "c.count": torch.tensor(3, dtype=torch.int64),
        "d.big": torch.randn(700, 13).to(torch.float16),
    }
    outs = [OutputTensor(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    with CheckpointWriter(tmp_path / "out", outs) as w:
        for k in reversed(list(ts)):
            v = ts[k]
            if v.dim() and v.shape[0] > 10:
                for r0 in reversed(range(0, v.shape[0], 10)):  # chunks back to front
                    r1 = min(r0 + 10, v.shape[0])
                    w.write_rows(k, r0, r1, v[r0:r1])
            else:
                w.write(k, v)
    back = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_checkpoint_writer_refuses_a_forgotten_tensor(tmp_path):
    outs = [OutputTensor("a", (4,), torch.float32), OutputTensor("b", (4,), torch.float32)]
    with pytest.raises(RuntimeError, match="output incomplete"):
        with CheckpointWriter(tmp_path / "out", outs) as w:
            w.write("a", torch.zeros(4))
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_writer_refuses_a_wrong_dtype(tmp_path):
    outs = [OutputTensor("a", (4,), torch.bfloat16)]
    with pytest.raises(RuntimeError, match=r"tensor 'a': dtype torch.float32, expected torch.bfloat16"):
        with CheckpointWriter(tmp_path / "out", outs) as w:
            w.write("a", torch.zeros(4))
    assert list(tmp_path.iterdir()) == []
