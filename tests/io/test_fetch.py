"""URL inputs: the retrying fetcher, threaded reads, URL-list manifests, and a score pass over http(s) URLs.

Images are served by a local HTTP server on 127.0.0.1 (started and stopped here) that can answer 404, fail a
given number of times before answering, send ``Retry-After``, or hang past the client's timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cskd_ray.io import storage
from cskd_ray.io.demo import make_demo_data
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.io.fetch import FetchError, FetchPolicy, fetch_url, read_many
from cskd_ray.io.sources import SourceConfig, expand_sources


class ImageServer:
    """Serves ``files`` at ``/img/<name>``; ``/flaky/<k>/<name>`` fails with 503 k times first, ``/slow/<s>/<name>``
    answers after s seconds, ``/throttle/...`` always 429; records requests and the most ``/slow/0.2/`` in flight."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.failures, self.requests = files, {}, []
        self.in_flight = self.max_in_flight = 0  # of requests whose path starts with count_prefix
        self.count_prefix = "/slow/0.2/"
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                counted = self.path.startswith(server.count_prefix)
                with server.lock:
                    server.requests.append(self.path)
                    server.in_flight += counted
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.answer(self)
                finally:
                    with server.lock:
                        server.in_flight -= counted

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        parts = handler.path.strip("/").split("/")
        if parts[0] == "slow":
            time.sleep(float(parts[1]))
            parts = parts[2:]
        elif parts[0] == "flaky":
            key = handler.path
            with self.lock:
                self.failures[key] = self.failures.get(key, 0) + 1
                failing = self.failures[key] <= int(parts[1])
            if failing:
                handler.send_response(503)
                handler.send_header("Retry-After", "0")
                handler.end_headers()
                return
            parts = parts[2:]
        elif parts[0] == "throttle":
            handler.send_response(429)
            handler.end_headers()
            return
        name = parts[-1]
        if parts[0] != "img" and parts[0] != name or name not in self.files:
            handler.send_error(404, "Not Found")
            return
        body = self.files[name]
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("served")
    make_demo_data(root, 6, 0.0, image_size=64, num_corrupt=1)
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


@pytest.fixture(scope="module")
def server(images: dict[str, bytes]) -> Iterator[ImageServer]:
    served = ImageServer(images)
    yield served
    served.close()


FAST = FetchPolicy(timeout_s=2.0, attempts=3, backoff_s=0.01)


def test_fetch_reads_retries_and_names_failures(server: ImageServer, images: dict[str, bytes]) -> None:
    name = sorted(images)[0]
    assert fetch_url(server.url(f"img/{name}"), FAST) == images[name]
    assert fetch_url(server.url(f"flaky/2/{name}"), FAST) == images[name]  # two 503s, then the body
    assert server.requests.count(f"/flaky/2/{name}") == 3
    with pytest.raises(FetchError, match=r"/flaky/5/.*: HTTP 503 .*\(3 attempts\)$"):
        fetch_url(server.url(f"flaky/5/{name}"), FAST)
    before = len(server.requests)
    with pytest.raises(FetchError, match=r"/img/nothing.jpg: HTTP 404 Not Found$"):
        fetch_url(server.url("img/nothing.jpg"), FAST)
    assert len(server.requests) == before + 1  # a 404 is not retried
    with pytest.raises(FetchError, match=r"timed out after 0.3 s \(2 attempts\)$"):
        fetch_url(server.url(f"slow/1.5/{name}"), FetchPolicy(timeout_s=0.3, attempts=2, backoff_s=0.01))
    with pytest.raises(FetchError, match=r"larger than 10 bytes"):
        fetch_url(server.url(f"img/{name}"), FetchPolicy(max_bytes=10))
    with pytest.raises(FetchError, match=r"cannot connect"):
        fetch_url("http://127.0.0.1:9/img/x.jpg", FetchPolicy(timeout_s=1, attempts=1))


def test_retry_after_and_backoff_are_bounded(server: ImageServer) -> None:
    policy = FetchPolicy(backoff_s=0.5)
    assert [policy.delay(k) for k in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert policy.delay(0, "3") == 3.0 and policy.delay(0, "3600") == 30.0 and policy.delay(1, "soon") == 1.0
    waits: list[float] = []
    with pytest.raises(FetchError, match=r"/throttle/x: HTTP 429 .*\(3 attempts\)$"):
        fetch_url(server.url("throttle/x"), FetchPolicy(attempts=3, backoff_s=0.25), sleep=waits.append)
    assert waits == [0.25, 0.5]  # backoff between attempts, none after the last


def test_policy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSKD_HTTP_ATTEMPTS", "7")
    monkeypatch.setenv("CSKD_HTTP_TIMEOUT_S", "2.5")
    assert FetchPolicy.from_env() == FetchPolicy(timeout_s=2.5, attempts=7)
    monkeypatch.setenv("CSKD_HTTP_ATTEMPTS", "none")
    with pytest.raises(ValueError, match=r"CSKD_HTTP_ATTEMPTS='none': expected a positive number"):
        FetchPolicy.from_env()


def test_read_many_keeps_order_bounds_concurrency_and_isolates_failures(server: ImageServer,
                                                                        images: dict[str, bytes]) -> None:
    names = sorted(images)
    urls = [server.url(f"slow/0.2/{name}") for name in names] * 2 + [server.url("img/missing.jpg")]
    lock, in_flight, most = threading.Lock(), [0], [0]

    def counted_fetch(url: str) -> bytes:  # the bound is the client's: count where read_many calls the read
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return fetch_url(url, FAST)
        finally:
            with lock:
                in_flight[0] -= 1

    started = time.perf_counter()
    results = read_many(urls, 4, counted_fetch)
    assert [r for r in results[:-1]] == [images[n] for n in names] * 2
    assert isinstance(results[-1], FetchError) and "404" in str(results[-1])
    # the server's own count may see a 5th request arrive before the handler of an answered one has finished
    assert 2 <= most[0] <= 4 and server.max_in_flight >= 2
    assert time.perf_counter() - started < 0.2 * len(urls)  # overlapped, not one after another
    assert read_many([], 4, storage.read_bytes) == []


def test_storage_reads_urls_and_manifests_list_them(server: ImageServer, images: dict[str, bytes],
                                                    tmp_path: Path) -> None:
    name = sorted(images)[1]
    assert storage.read_bytes(server.url(f"img/{name}")) == images[name]
    with pytest.raises(storage.StorageError, match="HTTP 404"):
        storage.read_bytes(server.url("img/none.jpg"))
    urls = [server.url(f"img/{n}") for n in sorted(images)]
    (tmp_path / "urls.txt").write_text("# an img2dataset-style URL list\n" + "\n".join(urls) + "\n\nlocal.jpg\n")
    assert expand_sources([SourceConfig(uri=str(tmp_path / "urls.txt"))]) == [*urls, str(tmp_path / "local.jpg")]
    pq.write_table(pa.table({"url": urls, "caption": ["x"] * len(urls)}), tmp_path / "urls.parquet")
    assert expand_sources([SourceConfig(uri=str(tmp_path / "urls.parquet"))]) == urls


@pytest.mark.ray
def test_score_pass_over_a_url_list(ray_session, server: ImageServer, images: dict[str, bytes],
                                    tmp_path: Path) -> None:
    from test_score import write_model_folder

    from cskd_ray.stages import load_config
    from cskd_ray.stages.score import run

    good = sorted(n for n in images if "corrupt" not in n and images[n][:2] == b"\xff\xd8")[:3]
    urls = [server.url(f"img/{n}") for n in good]
    urls += [server.url(f"flaky/1/{good[0]}"),  # same content as urls[0], after one 503
             server.url("img/missing.jpg")]  # 404
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    model = write_model_folder(tmp_path / "model")
    cfg = load_config("score", None, [f"model={model}", "batch_size=4", "decode_batch_size=8", "read_threads=4"],
                      input_uris=[str(tmp_path / "urls.txt")], output_uri=str(tmp_path / "scores"))
    summary = run(cfg, progress=lambda line: None)
    assert summary["images_in"] == 5 and summary["run"]["reused"] == 1  # the flaky URL's content is urls[0]'s
    table = ResultTable(str(tmp_path / "scores"), LABEL_SCHEMA).read().to_pydict()
    rows = dict(zip(table["uri"], zip(table["score"], table["error"], strict=True), strict=True))
    assert sorted(rows) == sorted(urls)  # one row per input URL
    assert rows[urls[3]][0] == pytest.approx(rows[urls[0]][0]) and rows[urls[3]][1] is None
    assert rows[urls[4]][0] is None and rows[urls[4]][1].startswith("read error: ") and "HTTP 404" in rows[urls[4]][1]
    assert all(rows[u][1] is None and 1 <= rows[u][0] <= 10 for u in urls[:3])
