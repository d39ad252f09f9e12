"""One way to open any URI: local paths and ``s3://`` through pyarrow filesystems.

The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables and the
region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; credentials come from the standard AWS chain
(environment, shared credentials file, instance profile) inside pyarrow. Nothing here reads
credentials from config files of this project or logs them.

Object storage fails now and then (503 SlowDown under load, dropped connections). Every S3 call made through
:func:`s3_filesystem` (our reads and writes, Ray Data's Parquet reads, Ray Train's checkpoint uploads) is retried
by the AWS SDK: up to ``CSKD_S3_MAX_ATTEMPTS`` attempts (default 10) on throttling, 5xx and network errors, with
the backoff of the standard AWS variable ``AWS_RETRY_MODE``: ``standard`` (the default: the backoff with jitter
AWS recommends under throttling, up to seconds between attempts) or ``legacy`` (the SDK's older 25 ms · 2^k: quick
retries for a nearby store such as MinIO or a test server). The SDK's ``adaptive`` mode is not available in
pyarrow and runs as ``standard``. With a fault rate p per request, a call fails only when all attempts do: p^10 ≈
1e-7 at p = 20%. Some failures happen after the SDK has accepted a response (a body cut mid-stream:
``INTERNAL_FAILURE ... Failed to flush response stream``) and are not retried by it; :func:`retry_io` repeats our
whole operation on those (``CSKD_S3_OP_ATTEMPTS``, default 4, backoff 0.2 s · 2^k), the way Ray Data's
``retried_io_errors`` does for its own reads.

Outputs are written atomically and at most once: :func:`write_bytes_once` writes to a temporary name
and renames it into place on local disks, and relies on S3's all-or-nothing ``PutObject`` /
multipart completion on object storage, so a reader never sees half a file.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from cskd_ray.io.fetch import FetchError, fetch_url, is_url

S3_SCHEMES = ("s3", "s3a")
GLOB_CHARS = "*?["
DEFAULT_S3_MAX_ATTEMPTS = 10
S3_RETRY_MODES = {"standard": pafs.AwsStandardS3RetryStrategy, "legacy": pafs.AwsDefaultS3RetryStrategy}
DEFAULT_S3_OP_ATTEMPTS = 4
# Messages of transient object-storage failures (as pyarrow words them), retried by retry_io.
TRANSIENT_ERRORS = ("INTERNAL_FAILURE", "NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "THROTTLING",
                    "REQUEST_TIMEOUT", "HTTP status 5", "Failed to flush response stream")

logger = logging.getLogger(__name__)


class StorageError(OSError):
    """A URI cannot be opened, listed or written; the message names the URI."""


@dataclass(frozen=True)
class FileEntry:
    """One object found by :func:`list_files`."""

    uri: str
    size: int


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage rather than a local path."""
    return urlparse(uri).scheme in S3_SCHEMES


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the standard AWS variables, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _attempts_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        attempts = int(raw)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise StorageError(f"{name}={raw!r}: expected a whole number >= 1 (default {default})")
    return attempts


def s3_max_attempts() -> int:
    """Attempts per S3 call (``CSKD_S3_MAX_ATTEMPTS``, default 10); a malformed value is an error."""
    return _attempts_from_env("CSKD_S3_MAX_ATTEMPTS", DEFAULT_S3_MAX_ATTEMPTS)


def s3_retry_mode() -> str:
    """The SDK's retry backoff from ``AWS_RETRY_MODE`` (``standard`` when unset; see the module docstring).

    ``adaptive`` (often set for boto3 and the AWS CLI) runs as ``standard``, with a warning; another value is an
    error naming the choices.
    """
    mode = os.environ.get("AWS_RETRY_MODE", "standard").strip().lower() or "standard"
    if mode == "adaptive":
        _warn_once("AWS_RETRY_MODE=adaptive is not available in pyarrow's S3 client; using standard")
        return "standard"
    if mode not in S3_RETRY_MODES:
        raise StorageError(f"AWS_RETRY_MODE={mode!r}: pyarrow's S3 client supports {sorted(S3_RETRY_MODES)} "
                           "(and adaptive, run as standard)")
    return mode


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with our retry strategy, also after pickling.

    pyarrow leaves ``retry_strategy`` out of an ``S3FileSystem``'s pickled state, so a copy sent to a Ray
    worker (Ray Train's checkpoint uploads, Ray Data's readers) would fall back to 3 attempts. This
    subclass pickles as the arguments that build it.
    """

    def __init__(self, endpoint: str | None, region: str, max_attempts: int, retry_mode: str = "standard") -> None:
        # pyarrow hands the legacy strategy its number as the SDK's *retries* (attempts = retries + 1)
        tries = max_attempts if retry_mode == "standard" else max_attempts - 1
        kwargs: dict = {"region": region, "retry_strategy": S3_RETRY_MODES[retry_mode](max_attempts=tries)}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        super().__init__(**kwargs)
        self.spec = (endpoint, region, max_attempts, retry_mode)

    def __reduce__(self) -> tuple:
        return (_s3_filesystem, self.spec)


def retry_io(operation: Callable[[], object], uri: str) -> object:
    """Run ``operation`` (an I/O call on ``uri``), repeating it on transient object-storage errors.

    Local paths run it once. For ``s3://`` URIs an ``OSError`` whose message names a transient failure
    (see ``TRANSIENT_ERRORS``) is retried up to ``CSKD_S3_OP_ATTEMPTS`` times in all (default 4) with
    exponential backoff and jitter (0.2 s · 2^k · U(0.5, 1.5)); any other error is raised at once.
    """
    attempts = _attempts_from_env("CSKD_S3_OP_ATTEMPTS", DEFAULT_S3_OP_ATTEMPTS) if is_remote(uri) else 1
    for attempt in range(attempts):
        try:
            return operation()
        except OSError as exc:
            transient = not isinstance(exc, FileNotFoundError) and any(t in str(exc) for t in TRANSIENT_ERRORS)
            if not transient or attempt + 1 == attempts:
                raise
            delay = 0.2 * 2**attempt * random.uniform(0.5, 1.5)
            logger.warning("%s: transient storage error (attempt %d of %d, again in %.1f s): %s", uri, attempt + 1,
                           attempts, delay, str(exc).splitlines()[0])
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str, max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS,
                   retry_mode: str = "standard") -> pafs.S3FileSystem:
    return RetryingS3FileSystem(endpoint, region, max_attempts, retry_mode)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the environment (endpoint, region; credentials from AWS chain)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3_filesystem(s3_endpoint(), region, s3_max_attempts(), s3_retry_mode())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split a URI into a pyarrow filesystem and the path inside it.

    Args:
        uri: A local path (absolute, relative or ``file://``) or ``s3://bucket/key``.

    Returns:
        The filesystem and the path to pass to it (``bucket/key`` for S3, an absolute path locally).
    """
    parsed = urlparse(uri)
    if parsed.scheme in S3_SCHEMES:
        if not parsed.netloc:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
        # Keys may hold '#' or '?': take everything after the scheme, not urlparse's path.
        return s3_filesystem(), uri.split("://", 1)[1].rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(uri.split("://", 1)[1])
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r}; use a local path or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _to_uri(template: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as ``template``."""
    if is_remote(template):
        return f"{urlparse(template).scheme}://{path}"
    return path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (works for s3:// and local paths alike)."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    """Whether a file or directory exists at ``uri``."""
    fs, path = resolve(uri)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return retry_io(lambda: fs.get_file_info(path), uri)
    except OSError as exc:
        raise StorageError(f"{uri}: {exc}") from exc


def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a directory (or a non-empty S3 prefix)."""
    fs, path = resolve(uri)
    return _info(fs, path, uri).type == pafs.FileType.Directory


def _matches(path: str, suffixes: tuple[str, ...] | None) -> bool:
    name = posixpath.basename(path)
    if name.startswith((".", "_")):
        return False  # hidden files and markers such as _SUCCESS / _meta.json are never inputs
    return suffixes is None or name.lower().endswith(tuple(s.lower() for s in suffixes))


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[FileEntry]:
    """List the files under a directory/prefix, or matching a glob, in sorted order.

    By default every object is an input (object keys often have no extension; the decoder decides
    what is an image); ``suffixes`` keeps only names ending with one of them (case-insensitive).
    Names starting with ``.`` or ``_`` are skipped.

    Args:
        uri: A directory, an S3 prefix, a single file, or a glob such as ``s3://b/photos/*/*.jpg``.
        suffixes: Optional name endings to keep, e.g. ``(".jpg", ".png")``.

    Raises:
        StorageError: When nothing exists at ``uri`` (for a glob: when its base does not exist).
    """
    glob_at = min((uri.find(c) for c in GLOB_CHARS if c in uri), default=-1)
    if glob_at >= 0:
        yield from _list_glob(uri, glob_at, suffixes)
        return
    fs, path = resolve(uri)
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.File:
        yield FileEntry(_to_uri(uri, info.path), info.size or 0)
        return
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: no such file, directory or prefix")
    try:
        infos = retry_io(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)), uri)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list: {exc}") from exc
    for found in sorted(infos, key=lambda i: i.path):
        rel = found.path[len(path) :].lstrip("/")
        if found.type == pafs.FileType.File and not any(p.startswith((".", "_")) for p in rel.split("/")):
            if _matches(found.path, suffixes):
                yield FileEntry(_to_uri(uri, found.path), found.size or 0)


def list_top(uri: str, suffixes: tuple[str, ...] | None = None) -> tuple[list[FileEntry], list[str]]:
    """One level of a directory / prefix: its files (filtered as :func:`list_files` does) and its subfolders' URIs.

    Sorted; names starting with ``.`` or ``_`` are skipped. On S3 this is one delimited listing (common prefixes),
    so the subfolders can then be listed in parallel.

    Raises:
        StorageError: Nothing exists at ``uri`` or it cannot be listed.
    """
    fs, path = resolve(uri)
    try:
        infos = retry_io(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=False)), uri)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file, directory or prefix") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list: {exc}") from exc
    files, folders = [], []
    for found in sorted(infos, key=lambda i: i.path):
        if posixpath.basename(found.path.rstrip("/")).startswith((".", "_")):
            continue
        if found.type == pafs.FileType.Directory:
            folders.append(_to_uri(uri, found.path.rstrip("/")))
        elif found.type == pafs.FileType.File and _matches(found.path, suffixes):
            files.append(FileEntry(_to_uri(uri, found.path), found.size or 0))
    return files, folders


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style match where ``*`` and ``?`` never cross a ``/`` (as in a shell or S3 console)."""
    parts, pattern_parts = path.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, pat) for part, pat in zip(parts, pattern_parts, strict=True)
    )


def _list_glob(uri: str, glob_at: int, suffixes: tuple[str, ...] | None) -> Iterator[FileEntry]:
    base = uri[:glob_at].rsplit("/", 1)[0] if "/" in uri[:glob_at] else "."
    pattern = resolve(uri)[1]
    for entry in list_files(base, suffixes):
        if _glob_match(resolve(entry.uri)[1], pattern):
            yield entry


def read_bytes(uri: str) -> bytes:
    """Read a whole object: a local file, an s3:// object, or an http(s) URL (:func:`cskd_ray.io.fetch.fetch_url`).

    Raises:
        StorageError: It does not exist or cannot be read (for a URL: the status, timeout or size, after retries).
    """
    if is_url(uri):
        try:
            return fetch_url(uri)
        except FetchError as exc:
            raise StorageError(str(exc)) from None
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    try:
        return retry_io(read, uri)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: {exc}") from exc


def read_text(uri: str) -> str:
    """Read a whole object as UTF-8 text."""
    return read_bytes(uri).decode("utf-8")


def makedirs(uri: str) -> None:
    """Create a directory (a no-op for S3 prefixes, which exist once an object is written)."""
    fs, path = resolve(uri)
    if not is_remote(uri):
        fs.create_dir(path, recursive=True)


def write_bytes_once(uri: str, data: bytes, *, overwrite: bool = False) -> bool:
    """Write ``data`` to ``uri`` atomically; by default never replace an existing object.

    Local files are written under a temporary name in the same directory and renamed into place
    (``os.link`` for write-once, so two writers cannot both win). On S3 a single ``PutObject`` /
    multipart upload only becomes visible when complete.

    Returns:
        True when this call wrote the object, False when it already existed (and was kept).
    """
    fs, path = resolve(uri)
    if not overwrite and exists(uri):
        return False
    if is_remote(uri):

        def write() -> None:
            with fs.open_output_stream(path) as out:
                out.write(data)

        try:
            retry_io(write, uri)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot write: {exc}") from exc
        return True
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    try:
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri`` (replacing it), streaming: nothing close to the file's size is held in memory.

    Local targets are written under a temporary name and renamed into place; an S3 upload becomes visible when
    complete.
    """
    fs, path = resolve(uri)

    def copy(target: str) -> None:
        with open(local_path, "rb") as source, fs.open_output_stream(target) as out:
            while chunk := source.read(8 << 20):
                out.write(chunk)

    if is_remote(uri):
        try:
            retry_io(lambda: copy(path), uri)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot write: {exc}") from exc
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        copy(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_once(uri: str, text: str, *, overwrite: bool = False) -> bool:
    """UTF-8 text version of :func:`write_bytes_once`."""
    return write_bytes_once(uri, text.encode("utf-8"), overwrite=overwrite)

