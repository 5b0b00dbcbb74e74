"""The six Jane Austen novels as plain text, from the Debian package ``r-cran-janeaustenr``.

The package stores the novels as an R lazy-load database (``Rdata.rdx`` is the index,
``Rdata.rdb`` the compressed, serialized objects); each novel is a character vector of
lines. PyPI ``rdata`` parses the serialized objects, so R itself is not needed. Without
root, unpack the package instead of installing it::

  apt-get download r-cran-janeaustenr
  dpkg-deb -x r-cran-janeaustenr_*.deb janeaustenr
  # data dir: janeaustenr/usr/lib/R/site-library/janeaustenr/data

Example:
  >>> novels = load_novels()
  >>> sorted(novels)
  ['emma', 'mansfieldpark', 'northangerabbey', 'persuasion', 'prideprejudice',
   'sensesensibility']
"""

import bz2
import lzma
import os
import zlib

DEFAULT_DATA_DIR = "/usr/lib/R/site-library/janeaustenr/data"

# Compression of a lazy-load database entry, by the type byte R writes when the index's
# ``compressed`` field is 2 or 3 (with True, every entry is zlib).
_DECOMPRESSORS = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                  b"0": lambda data: data}


def _read_rds(path_or_bytes):
  import rdata  # pylint: disable=import-outside-toplevel
  if isinstance(path_or_bytes, bytes):
    parsed = rdata.parser.parse_data(path_or_bytes, extension=".rds")
  else:
    parsed = rdata.parser.parse_file(path_or_bytes, extension=".rds")
  return rdata.conversion.convert(parsed)


def _entry(blob: bytes, compressed) -> bytes:
  # Each entry: a 4-byte big-endian uncompressed length, then the compressed object.
  if compressed in (2, 3):
    return _DECOMPRESSORS[blob[4:5]](blob[5:])
  return zlib.decompress(blob[4:])


def load_novels(data_dir: str | None = None) -> dict[str, str]:
  """The novels, ``{name: text}``, lines joined with newlines (blank lines between paragraphs).

  Args:
    data_dir: the package's ``data`` folder; ``$JANEAUSTENR_DATA`` or the Debian path
      when None.

  Returns:
    A dict from the R object name (``"emma"``, ``"persuasion"``, ...) to the text.

  Raises:
    FileNotFoundError: the package is not there (the message says how to get it).
  """
  data_dir = data_dir or os.environ.get("JANEAUSTENR_DATA", DEFAULT_DATA_DIR)
  index_path = os.path.join(data_dir, "Rdata.rdx")
  if not os.path.exists(index_path):
    raise FileNotFoundError(
        f"{index_path} not found. Install the Debian package r-cran-janeaustenr, or unpack it "
        "(apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb DIR) and "
        "pass DIR/usr/lib/R/site-library/janeaustenr/data.")
  index = _read_rds(index_path)
  compressed = int(index["compressed"][0])
  with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
    database = f.read()
  novels = {}
  for name, (offset, length) in index["variables"].items():
    blob = database[int(offset):int(offset) + int(length)]
    lines = _read_rds(_entry(blob, compressed))
    novels[str(name)] = "\n".join(str(line) for line in lines)
  return novels
