"""What a file's bytes are, whatever its name: tensor, array and model formats (refused by publish),
archives, images, text in its encoding; and the credentials in it, with their line numbers.

Formats are told by their own structure (magic bytes, headers, a protobuf or PNG chunk walk by
seeking), never by reading a whole file; credentials by streaming the whole file in chunks."""
from __future__ import annotations

import codecs
import json
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from opskit.results.credentials import scan_pieces

HEAD = 1 << 16   # bytes read to tell a format
CHUNK = 1 << 20  # bytes per piece when scanning for credentials
TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # pickled first by old torch.save
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at 0, 512, 1024, 2048, ... (after a user block)
LEVELDB_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")  # end of a TF checkpoint .index table
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARCHIVES = [(b"\x1f\x8b", "a gzip file"), (b"BZh", "a bzip2 file"), (b"\xfd7zXZ\x00", "an xz file"),
            (b"\x28\xb5\x2f\xfd", "a zstd file"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
            (b"\x04\x22\x4d\x18", "an lz4 file"), (b"Rar!\x1a\x07", "a rar archive")]
IMAGES = [(b"\xff\xd8\xff", "JPEG image"), (b"GIF87a", "GIF image"), (b"GIF89a", "GIF image"), (b"%PDF-", "PDF")]
BOMS = [(b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")]
_NOT_TEXT = re.compile("[\x00-\x07\x0e-\x1a\x1c-\x1f\x7f\ufffd]")  # \b \t \n \v \f \r ESC are fine in logs
_PROTOCOL0_PICKLE = re.compile(rb"\A(?:\((?:dp|lp)0\n|c[A-Za-z_][\w.]*\n[A-Za-z_]\w*\n|[}\]]q\x00)")
ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}  # ModelProto: wire type


@dataclass(frozen=True)
class Finding:
    """One reason a file must not be published: its format (`line` None) or a credential at `line`."""
    what: str
    line: int | None = None
    kind: str = "credential"  # or "format"

    def __str__(self) -> str:
        return self.what + (f" (line {self.line})" if self.line else "")


@dataclass(frozen=True)
class Sniff:
    refused: str | None    # why the bytes must not be published ("safetensors tensor file"), else None
    encoding: str | None   # how to read it for credentials: a text encoding, latin-1 for an allowed binary
    what: str              # "text (utf-16-le)", "PNG image", ...


def sniff(f: BinaryIO, size: int) -> Sniff:
    """What the open binary file `f` of `size` bytes holds."""
    f.seek(0)
    head = f.read(HEAD)
    if not head:
        return Sniff(None, "utf-8", "empty")
    why = _model_format(f, head, size)
    if why:
        return Sniff(why, None, why)
    if _tfrecord(head, size) is not None:  # not refused above: a TensorBoard event log
        return Sniff(None, "latin-1", "TensorBoard event log")
    if head.startswith(PNG_SIGNATURE):
        why = _png_problem(f, size)
        return Sniff(why, None, why) if why else Sniff(None, "latin-1", "PNG image")
    for magic, what in IMAGES:
        if head.startswith(magic):
            return Sniff(None, "latin-1", what)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniff(None, "latin-1", "WebP image")
    for magic, what in ARCHIVES:
        if head.startswith(magic):
            return _archive(what)
    if head[257:262] == b"ustar":
        return _archive("a tar archive")
    encoding = text_encoding(head)
    if encoding:
        return Sniff(None, encoding, f"text ({encoding})")
    return Sniff("binary data of no known results format (raw tensor data?)", None, "binary")


def _archive(what: str) -> Sniff:
    why = f"{what}: publish its files unpacked so they can be checked"
    return Sniff(why, None, why)


def _model_format(f: BinaryIO, head: bytes, size: int) -> str | None:
    if head.startswith(b"\x93NUMPY"):
        return "numpy .npy array"
    if head[:4] == b"GGUF":
        return "GGUF model file"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"algg"):
        return "GGML model file"
    if head[4:8] == b"TFL3":
        return "TFLite model"
    if len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return _pickle_kind(head)
    if _PROTOCOL0_PICKLE.match(head) and (b"p0\n" in head[:256] or b"q\x00" in head[:64]) and _at(f, size - 1, 1) == b".":
        return _pickle_kind(head)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _zip_kind(f)
    if _safetensors(head, size):
        return "safetensors tensor file"
    if any(_at(f, offset, 8) == HDF5_SIGNATURE for offset in _hdf5_offsets(size)):
        return "HDF5 file (Keras/h5py weights or arrays)"
    if head[0] == 0x08 and _onnx(f, size):
        return "ONNX model"
    if (record := _tfrecord(head, size)) is not None and b"brain.Event:" not in record:
        return "TFRecord file (serialized examples or tensors)"
    if size >= 48 and _at(f, size - 8, 8) == LEVELDB_MAGIC:
        return "TensorFlow checkpoint index (LevelDB table)"
    return None


def _at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _pickle_kind(head: bytes) -> str:
    if TORCH_LEGACY_MAGIC in head[:32] or b"torch" in head:
        return "torch pickle (torch.save legacy format)"
    if b"numpy" in head:
        return "Python pickle holding numpy arrays"
    return "Python pickle (can hold arrays and runs code when loaded)"


def _zip_kind(f: BinaryIO) -> str:
    try:
        f.seek(0)
        names = zipfile.ZipFile(f).namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "an unreadable zip archive"
    base = [n.rsplit("/", 1)[-1] for n in names]
    if {"data.pkl", "constants.pkl"} & set(base) or any("/.data/" in n for n in names):
        return "torch checkpoint (torch.save zip)"
    if names and all(n.endswith(".npy") for n in names):
        return "numpy .npz array archive"
    if any(n.endswith((".h5", ".safetensors", ".pt", ".bin", ".npy", ".onnx")) for n in names):
        return "zip archive of model weights"
    return "a zip archive: publish its files unpacked so they can be checked"


def _safetensors(head: bytes, size: int) -> bool:
    """8-byte little-endian header length, then that many bytes of JSON naming dtype/shape/offsets."""
    n = int.from_bytes(head[:8], "little")
    if len(head) < 10 or not 2 <= n <= size - 8 or head[8:9] != b"{":
        return False
    if n > len(head) - 8:  # a header longer than what was read: its start must name tensors
        return b'"dtype"' in head and b'"data_offsets"' in head
    try:
        header = json.loads(head[8:8 + n])
    except ValueError:
        return False
    return isinstance(header, dict) and all(
        k == "__metadata__" or (isinstance(v, dict) and "dtype" in v and "data_offsets" in v) for k, v in header.items())


def _hdf5_offsets(size: int) -> Iterator[int]:
    yield 0
    offset = 512
    while offset + 8 <= size:
        yield offset
        offset *= 2


def _varint(f: BinaryIO, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    for i, byte in enumerate(_at(f, pos, 10)):
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos + i + 1
    return None, pos


def _onnx(f: BinaryIO, size: int) -> bool:
    """The whole file parses as a protobuf ModelProto: only its fields, with their wire types, exactly
    up to the end, holding a graph. Skips over field contents by seeking."""
    pos, seen = 0, set()
    for _ in range(100_000):
        if pos == size:
            return 7 in seen and (1 in seen or 8 in seen)
        tag, pos = _varint(f, pos)
        if tag is None or ONNX_FIELDS.get(tag >> 3) != tag & 7:
            return False
        value, pos = _varint(f, pos)
        if value is None or (tag >> 3 == 1 and not 1 <= value <= 100):
            return False
        if tag & 7 == 2:
            pos += value
        if pos > size:
            return False
        seen.add(tag >> 3)
    return False


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(head: bytes, size: int) -> bytes | None:
    """The first record's data (as far as read) when the file starts as a TFRecord, else None."""
    if len(head) < 16:
        return None
    length = int.from_bytes(head[:8], "little")
    if 16 + length > size or _masked_crc32c(head[:8]) != int.from_bytes(head[8:12], "little"):
        return None
    return head[12:12 + length]


def _png_problem(f: BinaryIO, size: int) -> str | None:
    """None for a PNG that is only a PNG: IHDR first, chunks up to IEND, nothing after it."""
    pos, first = 8, True
    while pos + 12 <= size:
        header = _at(f, pos, 8)
        length, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if not kind.isalpha() or (first and kind != b"IHDR") or length >= 1 << 31:
            return "a file that starts like a PNG but is not one"
        first, pos = False, pos + 12 + length
        if kind == b"IEND":
            return None if pos == size else f"a PNG with {size - pos} bytes of other data after its end"
    return "a truncated PNG"


def text_encoding(head: bytes) -> str | None:
    """The text encoding of a file starting with `head` (a BOM, else the NUL pattern of UTF-16/32 text,
    else UTF-8), or None when decoding it that way gives more than 2 % non-text characters."""
    encoding = next((enc for bom, enc in BOMS if head.startswith(bom)), None) or _encoding_by_nuls(head[:4096])
    sample = head[:len(head) - len(head) % 4].decode(encoding, errors="replace")
    bad = len(_NOT_TEXT.findall(sample))
    return encoding if bad <= 0.02 * len(sample) else None


def _encoding_by_nuls(sample: bytes) -> str:
    n = len(sample) // 4 * 4
    if n < 4:
        return "utf-8"
    nul = [sample[i:n:4].count(0) / (n // 4) for i in range(4)]
    if min(nul[1:]) > 0.9 and nul[0] < 0.5:
        return "utf-32-le"
    if min(nul[:3]) > 0.9 and nul[3] < 0.5:
        return "utf-32-be"
    even, odd = (nul[0] + nul[2]) / 2, (nul[1] + nul[3]) / 2
    if odd > 0.6 and even < 0.2:
        return "utf-16-le"
    if even > 0.6 and odd < 0.2:
        return "utf-16-be"
    return "utf-8"


def _decoded(f: BinaryIO, encoding: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    f.seek(0)
    while chunk := f.read(CHUNK):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def scan_file(path: Path, limit: int = 20, credentials: bool = True) -> list[Finding]:
    """Why the bytes of `path` must not be published: [its format] when it is a tensor, array, model
    or archive format, else the credentials in it (whole file, any text encoding), at most `limit`."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        s = sniff(f, size)
        if s.refused:
            return [Finding(s.refused, kind="format")]
        if not credentials:
            return []
        return [Finding(f"what looks like {what}", line) for line, what in scan_pieces(_decoded(f, s.encoding), limit)]


def credential_findings(path: Path, limit: int = 20) -> list[Finding]:
    """The credentials in `path`, for any file (a model format is searched as raw bytes): one per
    line, at most `limit`. str(finding): "what looks like a WANDB_API_KEY (line 3)"."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        s = sniff(f, size)
        pieces = _decoded(f, s.encoding or "latin-1")
        return [Finding(f"what looks like {what}", line) for line, what in scan_pieces(pieces, limit)]


def credential_warnings(root: Path, files: Iterable[str], limit: int = 3) -> list[str]:
    """One line per pulled file holding credentials: "run.log contains what looks like a
    WANDB_API_KEY (line 3)". `files` are paths relative to `root`; missing ones are skipped."""
    out = []
    for rel in files:
        path = Path(root) / rel
        if not path.is_file() or path.is_symlink():
            continue
        found = credential_findings(path, limit + 1)
        if found:
            more = " and more" if len(found) > limit else ""
            out.append(f"{rel} contains " + ", ".join(str(x).removeprefix("what looks like ") if i else str(x)
                                                       for i, x in enumerate(found[:limit])) + more)
    return out
