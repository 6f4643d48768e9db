"""Torch weight files written opcode by opcode, without torch, for the bad-input corpus and the tests.

A pickle here is a `bytes` program assembled from the opcodes of Python's `pickletools` (PROTO,
GLOBAL, BINUNICODE, MARK, TUPLE, REDUCE, BUILD, BINPERSID, ...): a hostile payload is exactly the
bytes an attacker would write, not whatever `pickle.dumps` of a live object happens to produce.
`torch_zip` packs a pickle and its storage records in the layout of `torch.save`
(`archive/data.pkl`, `archive/data/<key>`, `archive/byteorder`, `archive/version`), `legacy_file` in
the pre-1.6 format (magic, protocol, sys_info, data and storage-key pickles, then each storage as an
int64 element count and its bytes), as torch/serialization.py (`_save`, `_legacy_save`) writes them.

    w = tensor("0", size=(2, 3), stride=(3, 1))           # _rebuild_tensor_v2 of storage record 0
    torch_zip(path, program(dict_({"w": w})), {"0": np.arange(6, dtype=np.float32).tobytes()})
"""

import pickle
import struct
import zipfile
import zlib

import numpy as np

# ---- opcodes ---------------------------------------------------------------------------------------

NONE = pickle.NONE
TRUE = pickle.NEWTRUE
FALSE = pickle.NEWFALSE
MARK = pickle.MARK
POP = pickle.POP
REDUCE = pickle.REDUCE
BUILD = pickle.BUILD


def program(body: bytes, protocol: int = 2) -> bytes:
  """A whole pickle: PROTO, `body` (which leaves one value on the stack), STOP."""
  return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


def global_(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def string(s: str) -> bytes:
  b = s.encode("utf-8", "surrogatepass")
  return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def bytes_(b: bytes) -> bytes:  # protocol 3
  return pickle.BINBYTES + struct.pack("<I", len(b)) + b


def integer(i: int) -> bytes:
  if -2**31 <= i < 2**31:
    return pickle.BININT + struct.pack("<i", i)
  n = (i.bit_length() + 8) // 8
  return pickle.LONG1 + bytes([n]) + i.to_bytes(n, "little", signed=True)


def tuple_(*items: bytes) -> bytes:
  return MARK + b"".join(items) + pickle.TUPLE


def ints(values) -> bytes:
  return tuple_(*(integer(v) for v in values))


def list_(*items: bytes) -> bytes:
  return pickle.EMPTY_LIST + (MARK + b"".join(items) + pickle.APPENDS if items else b"")


def dict_(items: dict[str, bytes]) -> bytes:
  pairs = b"".join(string(k) + v for k, v in items.items())
  return pickle.EMPTY_DICT + (MARK + pairs + pickle.SETITEMS if items else b"")


def call(func: bytes, *args: bytes) -> bytes:
  """`func(*args)`: the callable, the argument tuple, REDUCE."""
  return func + tuple_(*args) + REDUCE


def build(state: bytes) -> bytes:
  """BUILD: sets the state of the object on top of the stack (it stays there)."""
  return state + BUILD


def put(i: int) -> bytes:
  return pickle.LONG_BINPUT + struct.pack("<I", i)


def get(i: int) -> bytes:
  return pickle.LONG_BINGET + struct.pack("<I", i)


# ---- torch's pickled objects -----------------------------------------------------------------------


def storage(key: str, numel: int, storage_type: str = "FloatStorage", view: bytes | None = None) -> bytes:
  """A persistent id ('storage', torch.<type>, key, 'cpu', numel) and BINPERSID; `view` (legacy files
  only) appends a view tuple or NONE."""
  fields = [string("storage"), global_("torch", storage_type), string(key), string("cpu"), integer(numel)]
  if view is not None:
    fields.append(view)
  return tuple_(*fields) + pickle.BINPERSID


def tensor(key: str, size, stride=None, offset: int = 0, numel: int | None = None,
           storage_type: str = "FloatStorage", legacy: bool = False) -> bytes:
  """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.

  `stride` defaults to contiguous and `numel` (the storage's declared element count) to the view's.
  """
  size = tuple(size)
  if stride is None:
    stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
  if numel is None:
    numel = int(np.prod(size))
  return call(global_("torch._utils", "_rebuild_tensor_v2"),
              storage(key, numel, storage_type, NONE if legacy else None), integer(offset), ints(size),
              ints(stride), FALSE, call(global_("collections", "OrderedDict")))


def numpy_dtype(descr: str, state: bytes | None = None) -> bytes:
  """`numpy.dtype(descr, False, True)` and BUILD with `state` (default: what numpy writes for a plain
  little-endian number, `(3, '<', None, None, None, -1, -1, 0)`)."""
  if state is None:
    state = tuple_(integer(3), string("<"), NONE, NONE, NONE, integer(-1), integer(-1), integer(0))
  return build_on(call(global_("numpy", "dtype"), string(descr), FALSE, TRUE), state)


def build_on(obj: bytes, state: bytes) -> bytes:
  return obj + build(state)


def numpy_scalar(dtype: bytes, data: bytes) -> bytes:
  """`numpy.core.multiarray.scalar(dtype, data)`, as numpy pickles a scalar (protocol 2 writes the
  bytes as `_codecs.encode(latin1 str, 'latin1')`)."""
  raw = call(global_("_codecs", "encode"), string(data.decode("latin1")), string("latin1"))
  return call(global_("numpy.core.multiarray", "scalar"), dtype, raw)


# ---- files -----------------------------------------------------------------------------------------


def torch_zip(path, data_pkl: bytes, records: dict[str, bytes] | None = None, *,
              byteorder: bytes | None = b"little", compression: int = zipfile.ZIP_STORED,
              prefix: str = "archive") -> str:
  """Writes a `torch.save` zip archive: `data.pkl`, `data/<key>` for each record, `byteorder` (left
  out when None) and `version`. Returns the path as a string."""
  with zipfile.ZipFile(path, "w", compression=compression) as zf:
    zf.writestr(f"{prefix}/data.pkl", data_pkl)
    if byteorder is not None:
      zf.writestr(f"{prefix}/byteorder", byteorder)
    for key, raw in (records or {}).items():
      zf.writestr(f"{prefix}/data/{key}", raw)
    zf.writestr(f"{prefix}/version", "3\n")
  return str(path)


LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL = 1001


def legacy_file(path, data_pkl: bytes, storages: list[tuple[str, int, bytes]]) -> str:
  """Writes a pre-1.6 `torch.save` file: the magic, protocol and sys_info pickles, `data_pkl`, the
  storage-key list, then each storage as (key, declared element count, bytes)."""
  sys_info = dict_({"protocol_version": integer(LEGACY_PROTOCOL), "little_endian": TRUE,
                    "type_sizes": dict_({"short": integer(2), "int": integer(4), "long": integer(4)})})
  out = [program(integer(LEGACY_MAGIC)), program(integer(LEGACY_PROTOCOL)), program(sys_info), data_pkl,
         program(list_(*(string(key) for key, _, _ in storages)))]
  for _, numel, raw in storages:
    out.append(struct.pack("<q", numel) + raw)
  with open(path, "wb") as f:
    f.write(b"".join(out))
  return str(path)


def one_tensor_zip(path, extra: dict[str, bytes] | None = None, **kwargs) -> str:
  """A valid archive {"w": float32 [[0, 1, 2], [3, 4, 5]]} plus the pickled `extra` entries."""
  body = dict_({"w": tensor("0", (2, 3)), **(extra or {})})
  return torch_zip(path, program(body), {"0": np.arange(6, dtype=np.float32).tobytes()}, **kwargs)


def raw_zip(path, members: list[tuple[str, int, bytes, int, int]]) -> str:
  """Writes a zip archive from members given as (name, method, payload as stored in the archive,
  declared uncompressed size, declared CRC-32): what zipfile cannot write, e.g. a payload deflated
  beforehand or sizes that lie (APPNOTE.TXT 4.3.7 local header, 4.3.12 central directory, 4.3.16 end
  record; no zip64, so every size is below 4 GiB)."""
  local, central = bytearray(), bytearray()
  for name, method, payload, size, crc in members:
    n = name.encode()
    fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(payload), size, len(n), 0)
    central += struct.pack("<IH", 0x02014B50, 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0,
                                                                         len(local)) + n
    local += struct.pack("<I", 0x04034B50) + fields + n + payload
  end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local),
                    0)
  with open(path, "wb") as f:
    f.write(bytes(local + central + end))
  return str(path)


def deflated_zeros(nbytes: int, chunk: int = 64 * 2**20) -> tuple[bytes, int]:
  """(raw DEFLATE stream, CRC-32) of `nbytes` zero bytes (a multiple of `chunk`), made from one chunk:
  after a full flush the compressor starts afresh, so each chunk compresses to the same bytes."""
  assert nbytes % chunk == 0
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  zeros = bytes(chunk)
  block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
  crc = 0
  for _ in range(nbytes // chunk):
    crc = zlib.crc32(zeros, crc)
  return block * (nbytes // chunk) + c.flush(), crc


def stored(name: str, data: bytes) -> tuple[str, int, bytes, int, int]:
  """A `raw_zip` member stored as is, with its true size and CRC."""
  return (name, zipfile.ZIP_STORED, data, len(data), zlib.crc32(data))
