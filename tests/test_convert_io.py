"""The converters' fast I/O pieces: PieceWriter, FileRange, CRC-free torch.save records, glibc malloc
settings, mapped safetensors reads, and nemo_to_hf's prefetch giving the same bytes as without."""
from __future__ import annotations

import io
import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import convert_memory as cm
from convert import hf_to_nemo, nemo_to_hf
from convert.nemo_ckpt import DistCheckpointWriter, FileRange, NemoCheckpoint, read_dist_tensors, records_without_crc32
from recipes import fileio
from recipes.fileio import PieceWriter, keep_freed_memory

SMALL = {"hidden": 128, "ffn": 512, "heads": 4, "kv_heads": 2, "vocab": 1000}  # 2 groups: q/k/v interleaved


def _zip_crcs(raw: bytes) -> list[int]:
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        return [i.CRC for i in z.infolist()]


def test_piece_writer_writes_every_byte_in_bounded_pieces(tmp_path, monkeypatch):
    sizes = []
    real_write = os.write

    def spy(fd, data):
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(fileio, "WRITE_PIECE", 1000)
    monkeypatch.setattr(fileio.os, "write", spy)
    data = torch.arange(2_600, dtype=torch.uint8)
    with PieceWriter(tmp_path / "f") as w:
        assert w.write(b"head") == 4
        assert w.write(memoryview(data.numpy())) == 2_600
        assert w.tell() == 2_604 and not w.closed
    assert w.closed
    assert (tmp_path / "f").read_bytes() == b"head" + bytes(data.tolist())
    assert sizes == [4, 1000, 1000, 600]


def test_piece_writer_open_error_is_plain(tmp_path, monkeypatch):
    import gc
    import sys

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)  # an error raised in __del__ lands here
    with pytest.raises(FileNotFoundError) as err:
        PieceWriter(tmp_path / "no-such-dir" / "f")
    del err
    gc.collect()
    assert seen == []


def test_piece_writer_handles_short_writes(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(fileio.os, "write", lambda fd, data: real_write(fd, data[:7]))  # the kernel may write less
    with PieceWriter(tmp_path / "f") as w:
        w.write(bytes(range(100)))
    assert (tmp_path / "f").read_bytes() == bytes(range(100))


def test_file_range_reads_only_its_bytes(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)))
    with open(p, "rb", buffering=0) as f:
        r = FileRange(f, 10, 20)
        assert r.read(5) == bytes(range(10, 15)) and r.tell() == 5
        assert r.read() == bytes(range(15, 30))
        assert r.read(3) == b""
        r.seek(-4, os.SEEK_END)
        assert r.read() == bytes(range(26, 30))
        r.seek(100)
        assert r.tell() == 20  # clamped to the range
        r.seek(2)
        buf = bytearray(50)
        assert r.readinto(buf) == 18 and bytes(buf[:18]) == bytes(range(12, 30))


def test_records_without_crc32_write_zero_crcs_and_torch_loads_them():
    t = torch.randn(64, 33)
    with_crc = io.BytesIO()
    torch.save(t, with_crc)
    before = torch.serialization.get_crc32_options()
    without = io.BytesIO()
    with records_without_crc32():
        torch.save(t, without)
    assert torch.serialization.get_crc32_options() == before  # restored
    assert any(_zip_crcs(with_crc.getvalue())) and not any(_zip_crcs(without.getvalue()))
    without.seek(0)
    assert torch.equal(torch.load(without, weights_only=True), t)


def test_torch_load_does_not_check_record_crcs():
    """Why a zero CRC is safe: torch.load never checks one (a wrong CRC loads too), so the images
    NeMo 2.1 runs in read these records like any other."""
    t = torch.arange(1000, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save(t, buf)
    raw = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    struct.pack_into("<I", raw, info.header_offset + 14, info.CRC ^ 0xFFFFFFFF)  # local header's CRC
    cd = raw.index(b"PK\x01\x02")  # and the central directory's: entry by entry
    while raw[cd:cd + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", raw, cd + 28)
        if raw[cd + 46:cd + 46 + n].decode() == info.filename:
            struct.pack_into("<I", raw, cd + 16, info.CRC ^ 0xFFFFFFFF)
        cd += 46 + n + m + k
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z, pytest.raises(zipfile.BadZipFile):
        z.read(info.filename)  # Python's zip reader sees the bad CRC
    assert torch.equal(torch.load(io.BytesIO(bytes(raw)), weights_only=True), t)


def test_dcp_written_chunks_have_zero_crcs_and_torchs_reader_reads_them(tmp_path):
    tensors = {"a": torch.randn(4, 8), "b": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)}
    from torch.distributed.checkpoint import FileSystemReader

    w = DistCheckpointWriter(tmp_path / "weights")
    for k, t in tensors.items():
        w.declare(k, t.shape, t.dtype)
        w.write_chunk(k, (0, 0), t)
    w.close()
    raw = (tmp_path / "weights" / "__0_0.distcp").read_bytes()
    ranges = [(i.offset, i.length) for i in FileSystemReader(str(tmp_path / "weights")).read_metadata()
              .storage_data.values()]
    assert len(ranges) == 2
    for off, n in ranges:  # each chunk is one torch.save record, its CRC fields zero
        crcs = _zip_crcs(raw[off:off + n])
        assert crcs and not any(crcs)
    got = read_dist_tensors(tmp_path / "weights")  # torch.distributed.checkpoint's FileSystemReader
    for k, t in tensors.items():
        assert torch.equal(got["module." + k], t)


def test_mapped_record_is_the_saved_tensor_or_none(tmp_path):
    from convert.nemo_ckpt import mapped_record

    p = tmp_path / "records"
    items = [torch.randn(7, 5), torch.arange(10, dtype=torch.bfloat16), torch.randn(4, 6).t(),  # not contiguous
             {"not": "a tensor"}, torch.zeros(0)]
    ranges = []
    with open(p, "wb") as f, records_without_crc32():
        f.write(b"x" * 1001)  # records at unaligned offsets, as in a .distcp file
        for it in items:
            start = f.tell()
            torch.save(it, f)
            ranges.append((start, f.tell() - start))
    with open(p, "rb", buffering=0) as f:
        got = [mapped_record(f, off, n) for off, n in ranges]
    assert torch.equal(got[0], items[0]) and torch.equal(got[1], items[1])
    assert got[2] is None and got[3] is None and got[4] is None  # those are read with torch.load instead
    with open(p, "rb", buffering=0) as f:  # a cut record is refused, not mapped past its end
        assert mapped_record(f, ranges[0][0], ranges[0][1] - 200) is None


def test_rows_location_is_the_rows_bytes_or_none(tmp_path):
    w = DistCheckpointWriter(tmp_path / "weights", prefix="")
    whole = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)  # all layers in one chunk
    by_rows = torch.arange(48, dtype=torch.bfloat16).reshape(2, 4, 6)  # per layer, rows split 2 + 2
    by_cols = torch.arange(48, dtype=torch.float32).reshape(2, 4, 6)  # columns split (as TP row-parallel)
    flat = torch.arange(20, dtype=torch.float32).reshape(4, 5)  # not stacked
    for k, t in {"whole": whole, "by_rows": by_rows, "by_cols": by_cols, "flat": flat}.items():
        w.declare(k, t.shape, t.dtype)
    w.write_chunk("whole", (0, 0, 0), whole)
    for layer in range(2):
        w.write_chunk("by_rows", (layer, 0, 0), by_rows[layer:layer + 1, :2].clone())
        w.write_chunk("by_rows", (layer, 2, 0), by_rows[layer:layer + 1, 2:].clone())
        w.write_chunk("by_cols", (layer, 0, 0), by_cols[layer:layer + 1, :, :3].clone())
        w.write_chunk("by_cols", (layer, 0, 3), by_cols[layer:layer + 1, :, 3:].clone())
    w.write_chunk("flat", (0, 0), flat)
    w.close()
    ckpt = NemoCheckpoint.__new__(NemoCheckpoint)
    ckpt.weights_dir = tmp_path / "weights"

    def at(name, layer, lo, hi, like):
        loc = ckpt.rows_location(name, layer, lo, hi)
        if loc is None:
            return None
        path, off = loc
        raw = path.read_bytes()[off:off + like.numel() * like.element_size()]
        return torch.frombuffer(bytearray(raw), dtype=like.dtype).reshape(like.shape)

    assert torch.equal(at("whole", 1, 1, 3, whole[1, 1:3]), whole[1, 1:3])
    assert torch.equal(at("whole", 2, 0, 4, whole[2]), whole[2])
    assert torch.equal(at("by_rows", 1, 2, 4, by_rows[1, 2:]), by_rows[1, 2:])
    assert at("by_rows", 0, 1, 3, by_rows[0, 1:3]) is None  # spans two chunks
    assert at("by_cols", 0, 0, 1, by_cols[0, :1]) is None
    assert torch.equal(at("flat", None, 1, 3, flat[1:3]), flat[1:3])


def test_keep_freed_memory_sets_glibc_malloc():
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory() is True


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    base = tmp_path_factory.mktemp("io")
    info = cm.build_random_llama(base / "hf", size_gb=0.01, dtype="bfloat16", shard_bytes=3_000_000, shape=SMALL)
    return base, info


def _dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_mapped_tensors_equal_read_ones_and_are_unmapped_when_dropped(random_llama):
    import gc
    import mmap

    base, _ = random_llama
    reader = hf_to_nemo.SafetensorsReader(base / "hf")
    names = list(reader.entries)
    assert any(reader.entries[n].start % mmap.ALLOCATIONGRANULARITY for n in names)  # unaligned offsets too
    for n in names:
        m, g = reader.mapped(n), reader.get(n)
        assert m.dtype == g.dtype and m.shape == g.shape and torch.equal(m, g), n
        assert m.untyped_storage().nbytes() == reader.entries[n].nbytes  # torch.save writes just these bytes
    n = names[-1]
    path = str(reader.entries[n].file)

    def maps_of_file() -> int:
        return sum(line.rstrip().endswith(path) for line in open("/proc/self/maps"))

    gc.collect()
    before, orig = maps_of_file(), reader.get(n)
    t = reader.mapped(n)
    assert maps_of_file() == before + 1
    t.add_(1)  # copy-on-write: writing to the view never reaches the input file
    assert not torch.equal(t, orig)
    del t
    gc.collect()
    assert maps_of_file() == before  # unmapped with its last view
    assert torch.equal(reader.get(n), orig)


def test_nemo_to_hf_prefetch_writes_the_same_bytes(random_llama):
    base, info = random_llama
    nemo = base / "nemo"
    hf_to_nemo.convert(base / "hf", nemo, progress=False)
    outs = {}
    for prefetch in (True, False):
        outs[prefetch] = base / f"back-{prefetch}"
        nemo_to_hf.convert(nemo, outs[prefetch], max_shard_size="3MB", progress=False, prefetch=prefetch)
    a, b = _dir_bytes(outs[True]), _dir_bytes(outs[False])
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    index = json.loads((outs[True] / nemo_to_hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    from safetensors.torch import load_file
    src = {}
    for p in (base / "hf").glob("*.safetensors"):
        src.update(load_file(str(p)))
    back = {}
    for p in outs[True].glob("*.safetensors"):
        back.update(load_file(str(p)))
    assert src.keys() == back.keys() and all(torch.equal(src[k], back[k]) for k in src)
    assert NemoCheckpoint(nemo).load_layer("decoder.layers.mlp.linear_fc1.weight", 1).shape[0] == 2 * SMALL["ffn"]


def test_nemo_to_hf_copies_file_to_file_what_needs_no_reordering(random_llama, monkeypatch):
    """Everything but q/k/v is copied from the .distcp record's bytes (copy_file_range); the result is
    the same bytes as writing every tensor from memory."""
    base, info = random_llama
    nemo = base / "nemo-direct"
    hf_to_nemo.convert(base / "hf", nemo, progress=False)
    copied, written = [], []
    real_copy, real_write = nemo_to_hf.ShardWriter.write_from_file, nemo_to_hf.ShardWriter.write
    monkeypatch.setattr(nemo_to_hf.ShardWriter, "write_from_file",
                        lambda self, name, *a: copied.append(name) or real_copy(self, name, *a))
    monkeypatch.setattr(nemo_to_hf.ShardWriter, "write",
                        lambda self, name, t: written.append(name) or real_write(self, name, t))
    nemo_to_hf.convert(nemo, base / "direct", max_shard_size="3MB", progress=False)
    assert written and all(n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") for n in written)
    assert len(copied) == 9 * info["layers"] + 3 - len(written)
    monkeypatch.setattr(nemo_to_hf, "_file_slices", lambda *a, **k: None)
    nemo_to_hf.convert(nemo, base / "in-memory", max_shard_size="3MB", progress=False)
    a, b = _dir_bytes(base / "direct"), _dir_bytes(base / "in-memory")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_piece_writer_copy_from_falls_back_to_sendfile(tmp_path, monkeypatch):
    import errno

    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 10)

    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    for patch in (False, True):
        if patch:
            monkeypatch.setattr(fileio.os, "copy_file_range", refuse)
        with PieceWriter(tmp_path / f"out{patch}") as w:
            w.write(b"head")
            assert w.copy_from(src, 100, 2000) == 2000 and w.tell() == 2004
        assert (tmp_path / f"out{patch}").read_bytes() == b"head" + src.read_bytes()[100:2100]
    with PieceWriter(tmp_path / "short") as w, pytest.raises(EOFError, match="ends before"):
        w.copy_from(src, 2500, 200)


def test_nemo_to_hf_prefetch_stays_within_its_budget(random_llama, monkeypatch):
    """The next tensor is read ahead only when both, read and split, fit in the shard budget."""
    base, _ = random_llama
    nemo = base / "nemo-budget"
    hf_to_nemo.convert(base / "hf", nemo, progress=False)
    ckpt = NemoCheckpoint(nemo)
    import families
    from families.spec import AttentionShape
    fam = families.for_nemo(ckpt.model_yaml, ckpt.context_dir / "model.yaml")
    entries = nemo_to_hf.plan_tensors(ckpt, fam, ckpt.model_config, 1000)
    attn = AttentionShape.from_nemo(ckpt.model_config)
    calls = []
    real = nemo_to_hf._file_slices
    monkeypatch.setattr(nemo_to_hf, "_file_slices", lambda *a: calls.append(a[2]) or real(*a))  # every load
    # with a budget below two entries nothing is read ahead: each load follows the previous yield
    order = [len(calls) for _ in nemo_to_hf._prepared(entries, ckpt, attn, 1000, budget=1, prefetch=True)]
    assert order == list(range(1, len(entries) + 1))
    calls.clear()
    order = []
    for i, _ in enumerate(nemo_to_hf._prepared(entries, ckpt, attn, 1000, budget=10**12, prefetch=True)):
        deadline = time.monotonic() + 10
        while len(calls) < min(i + 2, len(entries)) and time.monotonic() < deadline:
            time.sleep(0.001)
        order.append(len(calls))
    assert order == [min(i + 2, len(entries)) for i in range(len(entries))]  # one ahead, never more
