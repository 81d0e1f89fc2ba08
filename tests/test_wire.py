"""Codec pipelines, manifests, chunking and reassembly: plain code, no network."""

import math

import pytest
import torch

from fedblock.common import wire
from fedblock.common.codecs import CodecError, CodecPipeline
from fedblock.common.messages import TensorSpec

torch.manual_seed(0)
DELTA = {"layer.w": torch.randn(64, 48) * 1e-3, "layer.b": torch.randn(48) * 1e-3}
SPECS = [TensorSpec(n, "float32", tuple(t.shape)) for n, t in DELTA.items()]


@pytest.mark.parametrize("spec", ["none", "zstd", "shuffle,zstd:1", "shuffle"])
def test_lossless_codecs_round_trip_bit_exactly(spec):
    codec = CodecPipeline(spec)
    assert codec.lossless
    out = codec.decode(codec.encode("b", DELTA), SPECS)
    for n, t in DELTA.items():
        assert torch.equal(out[n], t)


@pytest.mark.parametrize("spec,max_rel_err", [("bf16", 8e-3), ("fp16", 1e-3), ("int8", 1e-2), ("bf16,zstd", 8e-3)])
def test_lossy_codecs_are_close_and_smaller(spec, max_rel_err):
    codec = CodecPipeline(spec)
    blob = codec.encode("b", DELTA)
    out = codec.decode(blob, SPECS)
    raw = len(CodecPipeline("none").encode("b", DELTA))
    assert len(blob) < 0.6 * raw
    for n, t in DELTA.items():
        assert (out[n] - t).abs().max() <= max_rel_err * t.abs().max()


def test_topk_sends_a_fraction_and_feeds_back_the_rest():
    codec = CodecPipeline("topk:0.1")
    delta = {"w": torch.randn(1000)}
    spec = [TensorSpec("w", "float32", (1000,))]
    first = codec.decode(codec.encode("blk", delta), spec)["w"]
    assert (first != 0).sum() == 100
    kept = first != 0
    assert torch.equal(first[kept], delta["w"][kept])
    assert first.abs()[kept].min() >= delta["w"].abs()[~kept].max()
    # Error feedback: what was not sent comes back with the next delta of the same block.
    zero = {"w": torch.zeros(1000)}
    second = codec.decode(codec.encode("blk", zero), spec)["w"]
    assert (second != 0).sum() == 100 and not (kept & (second != 0)).any()
    # Over enough rounds everything gets through.
    total = first + second
    for _ in range(8):
        total += codec.decode(codec.encode("blk", zero), spec)["w"]
    torch.testing.assert_close(total, delta["w"], rtol=0, atol=1e-6)
    # Residuals are per block.
    other = codec.decode(codec.encode("other", zero), spec)["w"]
    assert other.abs().sum() == 0


def test_topk_wire_size_shrinks_with_the_fraction():
    delta = {"w": torch.randn(256, 256)}
    sizes = [len(CodecPipeline(f"topk:{f}").encode("b", delta)) for f in (0.01, 0.1)]
    assert sizes[0] < sizes[1] < 256 * 256 * 4 * 0.25


@pytest.mark.parametrize("spec", ["gzip", "topk", "topk:0", "topk:2", "zstd,bf16", "zstd:99", "int8:3"])
def test_bad_codec_specs_are_refused(spec):
    with pytest.raises(CodecError):
        CodecPipeline(spec)


def test_decode_refuses_malformed_and_mismatched_blobs():
    codec = CodecPipeline("none")
    blob = codec.encode("b", DELTA)
    with pytest.raises(CodecError, match="malformed"):
        codec.decode(b"\x00" * 64, SPECS)
    with pytest.raises(CodecError, match="tensor set"):
        codec.decode(blob, SPECS[:1])
    with pytest.raises(CodecError, match="shape"):
        codec.decode(blob, [TensorSpec("layer.w", "float32", (48, 64)), SPECS[1]])
    with pytest.raises(CodecError, match="zstd"):
        CodecPipeline("zstd").decode(blob, SPECS)
    ints = CodecPipeline("none").encode("b", {"layer.w": torch.zeros(64, 48), "layer.b": torch.zeros(48)})
    assert CodecPipeline("none").decode(ints, SPECS)["layer.b"].dtype == torch.float32
    with pytest.raises(CodecError, match="index out of range"):
        bad = CodecPipeline("topk:0.5")
        encoded = bad.encode("b", {"layer.w": torch.randn(64, 48), "layer.b": torch.randn(48)})
        bad.decode(encoded, [TensorSpec("layer.w", "float32", (2, 2)), SPECS[1]])


def pack(chunk_size=1024):
    return wire.pack("layers.3", DELTA, CodecPipeline("none"), round=4, base_version=3, chunk_size=chunk_size, num_tokens=77)


def test_manifest_describes_the_blob():
    manifest, blob = pack()
    assert manifest.wire_bytes == len(blob) and manifest.raw_bytes == (64 * 48 + 48) * 4
    assert manifest.num_chunks == math.ceil(len(blob) / 1024) > 10
    assert manifest.blob_sha256 == wire.sha256(blob)
    assert {t.name for t in manifest.tensors} == set(DELTA) and manifest.num_tokens == 77


@pytest.mark.parametrize("order", ["forward", "reverse", "duplicates"])
@pytest.mark.parametrize("on_disk", [False, True])
def test_chunks_reassemble_bit_exactly_in_any_order(tmp_path, order, on_disk):
    manifest, blob = pack()
    chunks = list(wire.iter_chunks(blob, manifest.chunk_size))
    if order == "reverse":
        chunks.reverse()
    elif order == "duplicates":
        chunks = chunks[:5] + chunks + chunks[3:9]
    assembly = wire.Assembly(manifest, tmp_path / "x.part" if on_disk else None)
    for i, data in chunks:
        assembly.add(i, bytes(data))
    assert assembly.complete and bytes(assembly.finish()) == blob
    decoded = CodecPipeline("none").decode(assembly.finish(), SPECS)
    assert all(torch.equal(decoded[n], DELTA[n]) for n in DELTA)
    assembly.close()
    assert not (tmp_path / "x.part").exists()


def test_corrupted_chunk_is_detected(tmp_path):
    manifest, blob = pack()
    assembly = wire.Assembly(manifest, tmp_path / "x.part")
    for i, data in wire.iter_chunks(blob, manifest.chunk_size):
        data = bytearray(data)
        if i == 7:
            data[100] ^= 0x01
        assembly.add(i, bytes(data))
    with pytest.raises(wire.IntegrityError, match="SHA-256"):
        assembly.finish()


def test_chunk_checks():
    manifest, blob = pack()
    assembly = wire.Assembly(manifest)
    with pytest.raises(wire.IntegrityError, match="index"):
        assembly.add(manifest.num_chunks, b"x")
    with pytest.raises(wire.IntegrityError, match="bytes"):
        assembly.add(0, b"short")
    assembly.add(0, blob[:1024])
    assert assembly.missing() == list(range(1, manifest.num_chunks))
    with pytest.raises(wire.IntegrityError, match="missing"):
        assembly.finish()


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_closed_assembly_refuses_chunks_without_blocking(tmp_path, on_disk):
    # More chunks than the hash queue holds: once closed, nothing may wait on the stopped hash thread.
    manifest, blob = pack(chunk_size=64)
    assert manifest.num_chunks > 64
    assembly = wire.Assembly(manifest, tmp_path / "x.part" if on_disk else None)
    chunks = list(wire.iter_chunks(blob, manifest.chunk_size))
    assembly.add(*chunks[0])
    assembly.close()
    for i, data in chunks[1:]:
        with pytest.raises(wire.AssemblyClosed):
            assembly.add(i, bytes(data))
    assert assembly.held == {0}


def test_skip_resends_only_missing_chunks():
    manifest, blob = pack()
    held = frozenset(range(0, manifest.num_chunks, 2))
    sent = [i for i, _ in wire.iter_chunks(blob, manifest.chunk_size, skip=held)]
    assert sent == [i for i in range(manifest.num_chunks) if i not in held]


def test_manifest_shape_checks():
    manifest, _ = pack()
    wire.check_manifest_shape(manifest, max_chunk_size=1 << 20, max_bytes=1 << 30)
    import dataclasses

    for change, match in [
        ({"num_chunks": manifest.num_chunks + 1}, "num_chunks"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"wire_bytes": 1 << 31}, "wire_bytes"),
        ({"blob_sha256": b"abc"}, "32 bytes"),
    ]:
        with pytest.raises(wire.IntegrityError, match=match):
            wire.check_manifest_shape(dataclasses.replace(manifest, **change), max_chunk_size=1 << 20, max_bytes=1 << 30)
    with pytest.raises(wire.IntegrityError, match="wrong tensor set"):
        wire.check_specs(manifest.tensors[:1], SPECS)
    with pytest.raises(wire.IntegrityError, match="dtype"):
        wire.check_specs([TensorSpec(s.name, "float16", s.shape) for s in SPECS], SPECS)
