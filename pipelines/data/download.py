"""Fetch a large file (the 84 MB IMDB tarball) over HTTP, safely and resumably.

Why not a plain `urlretrieve`: a flaky connection must not leave a half file
that later looks like the dataset, a second attempt should not start 84 MB
over, and a corrupt or different file must be caught before anyone untars it.
So the data first goes to `<dest>.part`, a later call resumes it with an HTTP
Range request, and only a complete file whose sha256 matches is renamed onto
`dest` (atomically, with os.replace). Every failure is a `DownloadError` that
names the URL or the file and the cause in plain words; callers add advice
(such as how to work offline).

Only the standard library (urllib.request) and tqdm (the progress bar) are used.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from pipelines.core.errors import DownloadError

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"

# "bytes 100-199/1000" (206) or "bytes */1000" (416); the total may be "*".
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks so an 84 MB file costs no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def part_path(dest: Path) -> Path:
    """Where an unfinished download of `dest` lives."""
    return dest.with_name(dest.name + ".part")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    timeout_s: float = 60.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download `url` to `dest` and return `dest`; resume a `.part` left before.

    `sha256=None` skips the checksum (then only the length is checked).
    Raises DownloadError on a network or HTTP failure, an interrupted transfer
    (the `.part` is kept, so calling again resumes) or a checksum mismatch (the
    bad `.part` is deleted).
    """
    dest = Path(dest)
    expected = sha256.strip().lower() if sha256 else None
    if dest.is_file() and (expected is None or sha256_of(dest, chunk_size) == expected):
        return dest  # already there: no network access at all
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)

    # Two rounds at most: the second only after a 416 left a .part that did not verify.
    for _ in range(2):
        outcome = _transfer(url, part, dest.name, timeout_s, progress, chunk_size)
        if outcome.complete:
            _verify_or_delete(url, part, expected, chunk_size)
            os.replace(part, dest)
            return dest
        # 416: the server has nothing after our offset, so the .part is either
        # the whole file already or junk (e.g. a newer, shorter file upstream).
        if _part_is_whole_file(part, outcome.total, expected, chunk_size):
            os.replace(part, dest)
            return dest
        part.unlink(missing_ok=True)
    raise DownloadError(
        "the server refused the byte range even for a fresh download (HTTP 416)", location=url
    )


def fetch_to_cache(url: str, cache_dir: Path, *, sha256: str | None, progress: bool = True) -> Path:
    """Download `url` into `cache_dir/<file name of the URL>`; reuse it if already valid."""
    cache_dir = Path(cache_dir)
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if name in ("", ".", ".."):
        raise DownloadError("the URL path has no file name to cache it under", location=url)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return download(url, cache_dir / name, sha256=sha256, progress=progress)


@dataclass(frozen=True)
class _Outcome:
    """What one HTTP request achieved: the whole body, or a 416 and the file's total size."""

    complete: bool
    total: int | None


def _transfer(
    url: str, part: Path, label: str, timeout_s: float, progress: bool, chunk_size: int
) -> _Outcome:
    """One request: resume (or start) `part` and stream the body into it."""
    offset = part.stat().st_size if part.exists() else 0
    # Range only when there is something to resume: a plain GET cannot get a 416.
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416:
            total = _parse_content_range(err.headers.get("Content-Range"))[2]
            err.close()
            return _Outcome(complete=False, total=total)
        raise DownloadError(f"HTTP {err.code} {err.reason}", location=url) from err
    except urllib.error.URLError as err:
        cause = f"cannot reach the server ({_plain(err.reason)})"
        raise DownloadError(cause, location=url) from err
    except (OSError, http.client.HTTPException) as err:
        # Connected, but no usable response: a timeout or a reset before the headers.
        cause = f"no valid response from the server ({_plain(err)})"
        raise DownloadError(cause, location=url) from err

    with response:
        start, length, total = _body_extent(url, response, offset)
        _stream(url, response, part, start, length, total, label, progress, chunk_size)
    return _Outcome(complete=True, total=total)


def _body_extent(
    url: str, response: http.client.HTTPResponse, offset: int
) -> tuple[int, int | None, int | None]:
    """Where the body goes in the file, its length and the file's total size (None: unknown)."""
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if getattr(response, "status", None) != 206:
        # 200 (or a server that ignores Range): the body is the whole file, from byte 0.
        return 0, length, length
    start, end, total = _parse_content_range(response.headers.get("Content-Range"))
    if start is None or start > offset:
        # A gap between what we have and what was sent would corrupt the file.
        raise DownloadError(
            f"the server answered a resume from byte {offset} with an unusable range "
            f"({response.headers.get('Content-Range')!r})",
            location=url,
        )
    if length is None and end is not None:
        length = end - start + 1
    return start, length, total


def _stream(
    url: str,
    response: BinaryIO,
    part: Path,
    start: int,
    length: int | None,
    total: int | None,
    label: str,
    progress: bool,
    chunk_size: int,
) -> None:
    """Copy the body into `part` at byte `start`; raise if fewer bytes than promised arrive."""
    received = 0
    mode = "r+b" if part.exists() else "wb"
    with open(part, mode) as out, tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        file=sys.stderr,  # looked up now, so redirected stderr (and tests) see it
        disable=not progress,
    ) as bar:
        # Drop what lies past `start`: after a 200 that is the whole old .part.
        out.truncate(start)
        out.seek(start)
        while True:
            try:
                chunk = response.read(chunk_size)
            except (OSError, http.client.HTTPException) as err:
                # A drop mid-body: what arrived is good data, so keep it to resume.
                out.flush()
                raise _interrupted(url, part, start + received, total, _plain(err)) from err
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    # http.client returns b"" rather than raising when a body ends early; a server
    # may also answer an open range with less than the rest of the file.
    short_body = length is not None and received < length
    short_file = total is not None and start + received < total
    if short_body or short_file:
        cause = "the connection closed early" if short_body else "the server sent only part of it"
        raise _interrupted(url, part, start + received, total, cause)


def _interrupted(url: str, part: Path, have: int, total: int | None, cause: str) -> DownloadError:
    of_total = f"{have} of {total} bytes" if total is not None else f"{have} bytes (total unknown)"
    return DownloadError(
        f"download interrupted ({cause}): received {of_total}; the partial file was kept "
        f"at {part}; re-running the download resumes from there",
        location=url,
    )


def _verify_or_delete(url: str, part: Path, expected: str | None, chunk_size: int) -> None:
    """Raise (deleting `part`: it is bad data, not resumable) if its sha256 is wrong."""
    if expected is None:
        return
    actual = sha256_of(part, chunk_size)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch: expected sha256 {expected}, got {actual}; "
            "the downloaded file was deleted",
            location=url,
        )


def _part_is_whole_file(
    part: Path, total: int | None, expected: str | None, chunk_size: int
) -> bool:
    """After a 416: is `part` the complete, correct file? Unknown counts as no."""
    if not part.exists():
        return False
    if total is not None and part.stat().st_size != total:
        return False
    if expected is not None:
        return sha256_of(part, chunk_size) == expected
    # No checksum: trust it only if the server told us the size and it matches.
    return total is not None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(first byte, last byte, total) from a Content-Range header; None where absent."""
    match = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if not match:
        return None, None, None
    first, last, total = match.groups()
    return _int_or_none(first), _int_or_none(last), _int_or_none(total)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _plain(reason: object) -> str:
    """An exception or reason as words; some (timeouts) have an empty str()."""
    text = str(reason)
    return text if text else type(reason).__name__
