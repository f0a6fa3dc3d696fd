"""The engine fails closed: a decoder that breaks, a container we cannot read
or a full disk never leaves a message CLEAN (issue 10, part A)."""

from __future__ import annotations

import gzip
import logging
import os
import tempfile

import pytest

from amavisd.decode import registry
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.registry import Undecipherable, WorkDirFailed
from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import eicar_message
from tests.unit.test_decode_engine import attach


@pytest.fixture
def broken_decoder(monkeypatch):
    """FAULT (named): the gzip decoder replaced by one that raises `error`,
    standing in for a decoder bug a real input would have to find first."""

    def install(error: BaseException):
        def decoder(part, ctx):
            ctx.add(part, b"first member")  # some output before the failure
            raise error

        monkeypatch.setitem(registry.REGISTRY, "gzip", decoder)

    return install


@pytest.mark.parametrize("error", [KeyError("x"), RecursionError(), LookupError("cp437"),
                                   FileNotFoundError(2, "No such file"), ValueError("bad")])
def test_an_unexpected_decoder_exception_is_unchecked_internal(broken_decoder, error, caplog):
    broken_decoder(error)
    raw = attach(gzip.compress(EICAR), "application/gzip", "a.gz")
    with caplog.at_level(logging.ERROR, logger="amavisd.decode"):
        dec = decompose(raw)
    assert [r.kind for r in dec.unchecked] == ["internal"]
    (gz,) = [p for p in dec.root.walk() if p.detected == "gzip"]
    assert "internal-error" in gz.flags
    assert gz in dec.scannable()  # the raw part still goes to the scanners
    assert [c.read() for c in gz.children] == [b"first member"]
    assert sum(r.exc_info is not None for r in caplog.records) == 1


def test_the_traceback_is_logged_once_a_message(broken_decoder, caplog):
    broken_decoder(KeyError("x"))
    part = attach(gzip.compress(EICAR), "application/gzip", "a.gz")
    raw = part.replace(b"--XYZ--", part[part.index(b"--XYZ\nContent-Type: application"):]
                       .rstrip(b"-\n") + b"\n--XYZ--", 1)
    with caplog.at_level(logging.ERROR, logger="amavisd.decode"):
        dec = decompose(raw)
    assert len([p for p in dec.root.walk() if p.detected == "gzip"]) == 2
    assert [r.kind for r in dec.unchecked] == ["internal", "internal"]
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_undecipherable_keeps_what_was_read_and_is_unchecked(broken_decoder):
    broken_decoder(Undecipherable("member 2: unsupported method 97"))
    dec = decompose(attach(gzip.compress(EICAR), "application/gzip", "a.gz"))
    assert [r.kind for r in dec.unchecked] == ["undecipherable"]
    assert "unsupported method 97" in dec.unchecked[0]
    (gz,) = [p for p in dec.root.walk() if p.detected == "gzip"]
    assert "undecipherable" in gz.flags and gz in dec.scannable()
    assert gz.children[0] in dec.scannable()


@pytest.mark.parametrize("errno_", [28, 122, 5])  # ENOSPC, EDQUOT, EIO
def test_resource_errors_in_a_decoder_are_ours_not_the_message_s(broken_decoder, errno_):
    broken_decoder(OSError(errno_, os.strerror(errno_)))
    with pytest.raises(WorkDirFailed):
        decompose(attach(gzip.compress(EICAR), "application/gzip", "a.gz"))


def test_a_full_work_dir_while_spilling_is_a_tempfail_not_clean(small_tmpfs):
    big = os.urandom(3 * 1024 * 1024) + EICAR  # spilled: over the spill threshold below
    raw = attach(gzip.compress(big, 1), "application/gzip", "big.gz")
    limits = Limits(spill_threshold=64 * 1024, max_memory=64 * 1024)
    with pytest.raises(WorkDirFailed, match="No space left"):
        decompose(raw, limits, tempbase=small_tmpfs)
    # with room, the same message decodes (and the EICAR is there for the scanner)
    with tempfile.TemporaryDirectory() as roomy:
        dec = decompose(raw, limits, tempbase=roomy)
        assert any(p.read().endswith(EICAR) for p in dec.scannable())
        dec.cleanup()


def test_a_full_work_dir_for_mime_parts_is_a_tempfail(small_tmpfs):
    raw = eicar_message().replace(b"eicar.com", b"e.com")
    raw += b"\n" + b"x" * (2 * 1024 * 1024)  # a large epilogue text part
    limits = Limits(spill_threshold=1024, max_memory=1024)
    with pytest.raises(WorkDirFailed):
        decompose(raw, limits, tempbase=small_tmpfs)


def test_a_failed_decomposition_leaves_no_work_dir_behind(small_tmpfs):
    big = os.urandom(3 * 1024 * 1024) + EICAR
    raw = attach(gzip.compress(big, 1), "application/gzip", "big.gz")
    with pytest.raises(WorkDirFailed):
        decompose(raw, Limits(spill_threshold=64 * 1024, max_memory=64 * 1024),
                  tempbase=small_tmpfs)
    assert os.listdir(small_tmpfs) == []


def test_a_failing_probe_is_unchecked_internal_not_an_exception(monkeypatch):
    """FAULT (named): the probes look for archives inside programs, reading
    hostile bytes; one that breaks must not escape decompose."""
    from amavisd.testing import archivers

    if archivers.available("zip"):
        pytest.skip(archivers.available("zip"))

    def broken_probe(part):
        raise IndexError("bytearray index out of range")

    monkeypatch.setitem(registry.PROBES, "zip", broken_probe)
    dec = decompose(attach(archivers.build("zip", {"a.txt": b"hello"}), "application/zip",
                           "a.zip"))
    assert [r.kind for r in dec.unchecked] == ["internal"]


def test_the_lha_header_found_by_fuzzing_in_a_self_extractor_probe():
    """Found by `make test`'s fuzzing: an lha level-2 header whose extended
    header ends at its last byte made the self-extractor probe index past it."""
    raw = (b"\x00\x00\x00\x1a\x00-lh5-C\x00\x00\x00D\x00\x00\x00\xa2!\x12k \x02\x13\x87"
           b"\x00\x05\x00\x00> \x0c\x00\x01eicar.com\x00\x00\x00DJ\x93i\x1f\xbc\x1a\x82\x84"
           b"\xd1\xb8\xd4yl+\x0e\x08l.\xa1*/\x05@\x18\x7f\n6j'\xe3\xbd>\xf0\xf7d\x7f6\x11\x8b"
           b"a\xfa\xe6Q\x1b\x05\xd0k!\xb4\x80j\x85\xd1[\x9b\x82N\xe8\x1b\x16\xf3R\xe9\xa53,"
           b"\x00-lh5-\x14\x00\x00\x00,\x01\x00\x00\xa2!\x12k \x02\xca\xbd\x00\x05\x00\x00\x1a"
           b"\xde\r\x00\x01readme.txt\x00\x00\x00\x082ik\xfc\x83$a\x05\x83\x84\xa7\xe5\x8b\x01"
           b"\xc6\x15w \x00")
    dec = decompose(attach(raw, "application/octet-stream", "a.lzh"))
    assert not any(r.kind == "internal" for r in dec.unchecked)
    dec.cleanup()
