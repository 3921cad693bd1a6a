"""``hetclip.data.tar.members`` reads what ``tarfile`` reads, in every header format, and fails the same way
on a truncated or damaged archive."""
import gzip
import io
import tarfile

import pytest

from hetclip.data.tar import members


def _archive(fmt, entries, **kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tar:
        for name, data in entries:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ENTRIES = [("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3), ("000001.txt", "a red círcle".encode()),
           ("d", None), ("d/000002.json", b"{}"), ("__meta__", b"skipped"), ("empty.txt", b""),
           ("x" * 120 + "/000003.txt", b"a long path"), ("ünïcode-" + "y" * 150 + ".txt", b"long name")]


def _by_tarfile(raw: bytes):
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
        for info in tar:
            if info.isreg() and not info.name.startswith("__"):
                out.append((info.name, tar.extractfile(info).read()))
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfiles_in_every_format(fmt):
    entries = ENTRIES if fmt != tarfile.USTAR_FORMAT else [e for e in ENTRIES if len(e[0]) < 100]
    raw = _archive(fmt, entries)
    got = list(members(io.BytesIO(raw)))
    assert got == _by_tarfile(raw)
    assert [n for n, _ in got] == [n for n, d in entries if d is not None and n != "__meta__"]


def test_compressed_archives_go_through_tarfile_and_a_pipe_may_return_short_reads():
    raw = _archive(tarfile.PAX_FORMAT, ENTRIES)
    assert list(members(io.BytesIO(gzip.compress(raw)))) == _by_tarfile(raw)

    class Trickle(io.BytesIO):
        def read(self, n=-1):
            return super().read(min(n, 100) if n and n > 0 else n)

    assert list(members(Trickle(raw))) == _by_tarfile(raw)


def test_truncated_and_damaged_archives_raise_as_tarfile_does():
    raw = _archive(tarfile.GNU_FORMAT, ENTRIES)
    cut = raw[:512 + 300]  # inside the first member's data
    names = []
    with pytest.raises(EOFError, match="unexpected end of data"):
        for name, _ in members(io.BytesIO(cut)):
            names.append(name)
    assert names == []
    with pytest.raises(EOFError):
        list(members(io.BytesIO(raw[:512 * 3 + 100])))  # inside the second header
    damaged = bytearray(raw)
    damaged[512 * 3 + 10] ^= 0xFF  # the second member's header: bad checksum
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(members(io.BytesIO(bytes(damaged))))
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(members(io.BytesIO(b"")))
    with pytest.raises(tarfile.ReadError):
        list(members(io.BytesIO(b"this is not a tar archive at all" * 40)))
    assert list(members(io.BytesIO(bytes(1024)))) == []  # an archive with no members
