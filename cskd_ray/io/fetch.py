"""Reading many inputs at once: http(s) URLs through a bounded, retrying fetcher, and threaded object reads.

A collection given as a URL list (``.txt`` with one URL per line, or a CSV/Parquet manifest whose ``uri`` or
``url`` column holds http(s) URLs; see :mod:`cskd_ray.io.sources`) is read here, in the read/decode tasks of an
image pass: each task reads its batch with up to ``threads`` requests in flight (object-store and HTTP reads
are latency-bound, so one sequential GET per image leaves the task idle), and every failure becomes that
input's error, never an exception of the task.

The retry policy of one URL (:class:`FetchPolicy`): up to ``attempts`` tries with exponential backoff
``backoff_s · 2^k`` (capped at 8 s, or the server's ``Retry-After`` up to 30 s) on what may pass (connection
errors, timeouts, HTTP 408, 425, 429, 500, 502, 503, 504); any other HTTP status fails at once with its code
(``HTTP 404 Not Found``). A body over ``max_bytes`` is an error rather than a memory blow-up. The environment
variables ``CSKD_HTTP_ATTEMPTS`` and ``CSKD_HTTP_TIMEOUT_S`` override the defaults for a whole job.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

from cskd_ray._version import __version__

HTTP_SCHEMES = ("http", "https")
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = f"cskd_ray/{__version__} (image aesthetics scoring)"


class FetchError(OSError):
    """A URL could not be read; the message starts with the URL and says why (status, timeout, size)."""


def is_url(uri: str) -> bool:
    """Whether ``uri`` is an http(s) URL."""
    return urlparse(uri).scheme.lower() in HTTP_SCHEMES


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a positive number") from None
    if number <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive number")
    return number


@dataclass(frozen=True)
class FetchPolicy:
    """How one URL is fetched: timeout per attempt, attempts, backoff, and the largest body accepted."""

    timeout_s: float = 30.0
    attempts: int = 4
    backoff_s: float = 0.5
    max_bytes: int = 64 << 20

    @classmethod
    def from_env(cls) -> FetchPolicy:
        """The defaults, with ``CSKD_HTTP_ATTEMPTS`` / ``CSKD_HTTP_TIMEOUT_S`` applied when set."""
        return cls(timeout_s=_env_number("CSKD_HTTP_TIMEOUT_S", cls.timeout_s),
                   attempts=int(_env_number("CSKD_HTTP_ATTEMPTS", cls.attempts)))

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try ``attempt + 1``: the server's ``Retry-After`` (≤ 30 s) or the backoff."""
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), 30.0)
        return min(self.backoff_s * 2**attempt, 8.0)


def fetch_url(url: str, policy: FetchPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> bytes:
    """GET ``url``'s body, retrying what may pass (see the module docstring).

    Raises:
        FetchError: The last attempt failed, the status is not retryable, or the body is over ``max_bytes``.
    """
    policy = policy or FetchPolicy.from_env()
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    reason = "no attempt"
    for attempt in range(policy.attempts):
        retry_after = None
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:  # noqa: S310 - http(s) only
                body = response.read(policy.max_bytes + 1)
            if len(body) > policy.max_bytes:
                raise FetchError(f"{url}: larger than {policy.max_bytes} bytes")
            return body
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code} {exc.reason}"
            if exc.code not in RETRYABLE_STATUS:
                raise FetchError(f"{url}: {reason}") from None
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
        except TimeoutError:
            reason = f"timed out after {policy.timeout_s:g} s"
        except urllib.error.URLError as exc:
            reason = f"cannot connect: {exc.reason}"
        except (ConnectionError, http.client.HTTPException) as exc:  # e.g. a connection dropped mid-body
            reason = f"connection failed: {type(exc).__name__}: {exc}"
        if attempt + 1 < policy.attempts:
            sleep(policy.delay(attempt, retry_after))
    raise FetchError(f"{url}: {reason} ({policy.attempts} attempts)")


def read_many(uris: Sequence[str], threads: int, read: Callable[[str], bytes]) -> list[bytes | Exception]:
    """``read(uri)`` for every URI with up to ``threads`` in flight; each result is the bytes or the exception.

    The order of the results is the order of ``uris``. An exception of one read never stops the others.
    """
    def one(uri: str) -> bytes | Exception:
        try:
            return read(uri)
        except Exception as exc:  # noqa: BLE001 - every failure becomes that input's error row
            return exc

    if threads <= 1 or len(uris) <= 1:
        return [one(uri) for uri in uris]
    with ThreadPoolExecutor(max_workers=min(threads, len(uris)), thread_name_prefix="cskd-read") as pool:
        return list(pool.map(one, uris))
