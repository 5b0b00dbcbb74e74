"""Finds or fetches the Jane Austen novels for the examples, and caches them as text.

``examples.austen.load_novels`` reads the novels from the R data folder of Debian's
``r-cran-janeaustenr``. This module finds that folder, first match wins:

1. ``data_dir`` (or ``$JANEAUSTENR_DATA``): a folder holding ``Rdata.rdb`` and ``Rdata.rdx``,
   e.g. a copy carried to a machine without network access;
2. the installed package's ``/usr/lib/R/site-library/janeaustenr/data``;
3. the cache, ``<cache>/janeaustenr/`` (``$HYPERATTENTION_JAX_CACHE`` or
   ``~/.cache/hyperattention_jax``), filled on first use with ``apt-get download
   r-cran-janeaustenr`` and ``dpkg-deb -x`` (nothing is installed and R is not needed; it
   needs Debian or Ubuntu with a reachable package mirror).

The texts are also written to the cache as ``<novel>.txt``, so later reads skip R parsing.

Example:
  >>> novel_text("prideprejudice").splitlines()[0]
  'PRIDE AND PREJUDICE'
"""

import os
import pathlib
import shutil
import subprocess
import tempfile

import austen

# The six novels in order of publication, keyed as in the R package.
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion")
DEBIAN_PACKAGE = "r-cran-janeaustenr"
_PACKAGE_DATA = "usr/lib/R/site-library/janeaustenr/data"


def cache_dir() -> pathlib.Path:
  """``<cache>/janeaustenr``, where the fetched database and the texts are kept."""
  root = os.environ.get("HYPERATTENTION_JAX_CACHE")
  root = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "hyperattention_jax"
  return root / "janeaustenr"


def _has_database(folder) -> bool:
  return bool(folder) and all((pathlib.Path(folder) / name).is_file()
                              for name in ("Rdata.rdb", "Rdata.rdx"))


def _apt_download(folder: pathlib.Path):
  def download():
    return subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=folder,
                          capture_output=True, text=True, check=False)
  result = download()
  if result.returncode != 0:  # a fresh machine may have no package lists yet
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, check=False)
    result = download()
  debs = sorted(folder.glob(f"{DEBIAN_PACKAGE}_*.deb"))
  if result.returncode != 0 or not debs:
    raise RuntimeError(
        f"'apt-get download {DEBIAN_PACKAGE}' failed ({result.stderr.strip()!r}). Copy the "
        "package's Rdata.rdb and Rdata.rdx into a folder and pass it as data_dir (or set "
        "$JANEAUSTENR_DATA).")
  return debs[0]


def fetch_database(target=None) -> pathlib.Path:
  """Downloads the Debian package and copies its R database into ``target`` (the cache)."""
  target = pathlib.Path(target or cache_dir())
  with tempfile.TemporaryDirectory() as tmp:
    deb = _apt_download(pathlib.Path(tmp))
    extracted = pathlib.Path(tmp) / "extracted"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("Rdata.rdb", "Rdata.rdx"):
      shutil.copyfile(extracted / _PACKAGE_DATA / name, target / name)
  return target


def database_dir(data_dir=None) -> pathlib.Path:
  """The folder holding ``Rdata.rdb`` / ``Rdata.rdx``, fetched into the cache if needed."""
  if data_dir is not None:
    if not _has_database(data_dir):
      raise FileNotFoundError(f"no Rdata.rdb / Rdata.rdx in data_dir={str(data_dir)!r}.")
    return pathlib.Path(data_dir)
  for candidate in (os.environ.get("JANEAUSTENR_DATA"), austen.DEFAULT_DATA_DIR, cache_dir()):
    if _has_database(candidate):
      return pathlib.Path(candidate)
  return fetch_database()


def novels(*, data_dir=None) -> dict[str, str]:
  """All six novels, ``name -> text`` (lines joined with newlines), in publication order."""
  texts_dir = cache_dir()
  if data_dir is None and all((texts_dir / f"{n}.txt").is_file() for n in NOVELS):
    return {n: (texts_dir / f"{n}.txt").read_text(encoding="utf-8") for n in NOVELS}
  texts = austen.load_novels(str(database_dir(data_dir)))
  if data_dir is None:
    texts_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
      (texts_dir / f"{name}.txt").write_text(text, encoding="utf-8")
  return {n: texts[n] for n in NOVELS}


def novel_text(novel: str, *, data_dir=None) -> str:
  """The full text of one novel (one of ``NOVELS``), title page included."""
  if novel not in NOVELS:
    raise ValueError(f"novel={novel!r} must be one of {NOVELS}.")
  return novels(data_dir=data_dir)[novel]
