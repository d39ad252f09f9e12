"""The run report: built from a real (tiny) run, its numbers equal the stages' JSON, and it renders in Chromium.

The run is made once per session by the real stages on the demo data (``teacher_run`` in conftest.py): a
teacher trained in two runs (the second resumes the first, so the training history must carry over), its
pseudo-labels and an evaluation.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import REPO

from cskd_ray.app.cli import main
from cskd_ray.app.report import write_report
from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.train.history import TrainingHistory, read_history

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
CONFIGS = REPO / "jobs" / "configs" / "demo"
TOP = 4


class _Page(HTMLParser):
    """Collects table cells (row key → cell attributes, and their texts), section notes, gallery scores and <img>
    tags."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.texts: dict[str, list[str]] = {}
        self._in_cell = False
        self.images: list[dict[str, str]] = []
        self.scores: list[float] = []
        self.section, self.row, self.sections, self.notes = None, None, [], {}
        self._in_note = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.section = a["id"]
            self.sections.append(a["id"])
        elif tag == "tr" and "data-row" in a:
            self.row = f"{self.section}:{a['data-row']}"
            self.rows.setdefault(self.row, [])
            self.texts.setdefault(self.row, [])
        elif tag == "td" and self.row:
            self.rows[self.row].append(a)
            self.texts[self.row].append("")
            self._in_cell = True
        elif tag == "img":
            self.images.append(a)
        elif tag == "b" and "data-score" in a:
            self.scores.append(float(a["data-score"]))
        self._in_note = tag == "p" and a.get("class") == "note"

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_note:
            self.notes[self.section] = data
        if self._in_cell:
            self.texts[self.row][-1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


EVAL_HEADER = ["evaluation", "model", "split", "images", "scored", "errors", "SRCC", "KRCC", "PLCC", "PLCC (logistic)",
               "accuracy", "EMD"]


def _evaluation_texts(folder: str, m: dict) -> list[str]:
    """The evaluation row as the page shows it: numbers to 4 decimals, "–" for what metrics.json lacks."""
    def shown(key: str) -> str:
        value = m.get(key)
        if value is None:
            return "–"
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f"{text} (no fit)" if key == "plcc_logistic" and m.get("plcc_logistic_fitted") is False else text

    return [folder, m.get("model_id") or m.get("model"), shown("split"),
            *[shown(k) for k in ("images", "scored", "errors", "srcc", "krcc", "plcc", "plcc_logistic", "accuracy",
                                 "emd")]]


@pytest.fixture(scope="module")
def demo_run(teacher_run: Path) -> Path:
    """The session's tiny real run (tests/conftest.py ``teacher_run``): a teacher trained in two runs (the second
    resumes the first), its pseudo-labels and its evaluation."""
    return teacher_run


@pytest.mark.ray
@pytest.mark.slow
def test_history_survives_resume_and_reaches_tensorboard(demo_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_history((demo_run / "teacher" / "metrics.jsonl").read_text())
    first = read_history((demo_run / "first-history.jsonl").read_text())
    steps = [r["step"] for r in records]
    assert [r["step"] for r in first] == [1, 2] and records[:2] == first  # restored, not restarted
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 2
    assert all({"loss", "lr", "epoch"} <= set(r) for r in records)
    state = json.loads((demo_run / "teacher" / "model" / "model.json").read_text())
    validated = [r for r in records if "val_srcc" in r]
    assert validated and state["metrics"]["val_srcc"] in [r["val_srcc"] for r in validated]
    events = EventAccumulator(str(demo_run / "teacher" / "tensorboard"))
    events.Reload()
    logged = [e.step for e in events.Scalars("train/loss")]
    assert sorted(logged) == steps  # each step once, across both runs
    assert [e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)] == pytest.approx(
        [r["loss"] for r in records])
    assert {e.step for e in events.Scalars("val/srcc")} == {r["step"] for r in validated}


@pytest.mark.ray
@pytest.mark.slow
def test_report_numbers_equal_the_stages_json(demo_run: Path, tmp_path: Path) -> None:
    assert main(["report", str(demo_run), "--output", str(tmp_path / "report.html"), "--top", str(TOP)]) == 0
    page = _parse(tmp_path / "report.html")
    assert page.sections == ["metrics", "curves", "scatter", "histograms", "galleries", "diagnose", "trials",
                             "configs"]
    assert set(page.notes) == {"diagnose", "trials"}  # missing pieces are visible notes
    metrics = json.loads((demo_run / "teacher" / "model" / "model.json").read_text())["metrics"]
    cells = {c.get("data-value") for c in page.rows["metrics:teacher"]}
    for name in ("val_srcc", "val_plcc", "val_accuracy", "val_emd", "loss"):
        assert repr(metrics[name]) in cells, name
    evaluation = json.loads((demo_run / "evaluate-teacher" / "metrics.json").read_text())
    cells = [c.get("data-value") for c in page.rows["metrics:evaluate-teacher"] if "data-value" in c]
    assert cells == [str(evaluation[k]) if isinstance(evaluation[k], int) else repr(evaluation[k])
                     for k in ("images", "scored", "errors", "srcc", "krcc", "plcc", "plcc_logistic", "accuracy",
                               "emd")]
    assert page.texts["metrics:evaluate-teacher"] == _evaluation_texts("evaluate-teacher", evaluation)
    scores = ResultTable(str(demo_run / "pseudo-labels"), LABEL_SCHEMA).read(["score", "error"])
    ok = sorted(s for s, e in zip(scores.column("score").to_pylist(), scores.column("error").to_pylist(),
                                  strict=True) if e is None)
    assert page.scores == ok[::-1][:TOP] + ok[:TOP]  # top N, then bottom N
    predictions = pq.read_table(demo_run / "evaluate-teacher" / "predictions.parquet")
    assert len(predictions) == evaluation["images"]
    thumbs = [i for i in page.images if i["src"].startswith("data:image/jpeg;base64,")]
    pngs = [i for i in page.images if i["src"].startswith("data:image/png;base64,")]
    assert len(thumbs) == 2 * TOP and len(pngs) == 3  # curves, scatter, histograms
    assert all(base64.b64decode(i["src"].split(",", 1)[1])[:4] == b"\x89PNG" for i in pngs)
    assert "http://" not in (tmp_path / "report.html").read_text().replace("http://www.w3.org", "")


def test_damaged_pieces_become_notes_and_an_empty_folder_is_an_error(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps({"srcc": 0.5, "plcc": 0.25, "model": "m"}))
    (run / "evaluate" / "predictions.parquet").write_bytes(b"not parquet")
    (run / "sweep").mkdir()
    (run / "sweep" / "trials.csv").write_text("trial_id,lr,val_srcc\na,0.001,0.25\nb,0.01,0.5\n")
    result = write_report(str(run))
    assert result.sections["metrics"] and result.sections["trials"] and not result.sections["scatter"]
    assert "could not be built" in result.notes["scatter"]
    page = _parse(run / "report.html")
    assert [c.get("data-value") for c in page.rows["trials:1"]] == [None, "0.01", "0.5"]
    # an evaluation from before KRCC and the logistic PLCC: their cells show "–" (no data-value)
    assert page.texts["metrics:evaluate"] == ["evaluate", "m", "–", "–", "–", "–", "0.5000", "–", "0.2500", "–", "–",
                                              "–"]
    assert [c.get("data-value") for c in page.rows["metrics:evaluate"]][6:10] == ["0.5", None, "0.25", None]
    failed = {"srcc": 0.5, "krcc": 0.375, "plcc": 0.25, "plcc_logistic": 0.25, "plcc_logistic_fitted": False,
              "accuracy": 0.75, "emd": 0.125, "images": 4, "scored": 4, "errors": 0, "split": "test", "model": "m"}
    (run / "evaluate-new").mkdir()
    (run / "evaluate-new" / "metrics.json").write_text(json.dumps(failed))
    page = _parse(Path(write_report(str(run)).output))
    assert page.texts["metrics:evaluate-new"] == _evaluation_texts("evaluate-new", failed)
    assert page.texts["metrics:evaluate-new"][9] == "0.2500 (no fit)"  # the plain PLCC, flagged
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no stage output found"):
        write_report(str(tmp_path / "empty"))
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: RUN_DIR")


def test_history_merges_validation_and_publishes_to_s3(s3_bucket: str, tmp_path: Path) -> None:
    history = TrainingHistory(f"{s3_bucket}/stage")
    history.log(1, 0, {"loss": 0.5, "lr": 1e-3})
    history.log(2, 0, {"loss": 0.25, "lr": 1e-3})
    history.log(2, 0, {"val_srcc": 0.75})
    history.save(tmp_path)
    history.publish()
    history.close()
    published = read_history(storage.read_text(f"{s3_bucket}/stage/metrics.jsonl"))
    assert published == [{"step": 1, "epoch": 0, "loss": 0.5, "lr": 1e-3},
                         {"step": 2, "epoch": 0, "loss": 0.25, "lr": 1e-3, "val_srcc": 0.75}]
    assert [e.uri for e in storage.list_files(f"{s3_bucket}/stage/tensorboard")][0].split("/")[-1].startswith(
        "events.out.tfevents")
    resumed = TrainingHistory(str(tmp_path / "local"))
    resumed.restore(tmp_path, step=1)  # a checkpoint at step 1: later records are dropped
    assert resumed.records == published[:1]
    assert TrainingHistory(str(tmp_path / "x"), enabled=False).records == []


def _devtools(user_data: Path, timeout: float = 20.0) -> str:
    port_file = user_data / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError("chromium did not open its DevTools port")
        time.sleep(0.1)
    port, path = port_file.read_text().split()[:2]
    return f"ws://127.0.0.1:{port}{path}"


class _Cdp:
    """A minimal DevTools protocol client over one websocket (browser target, flattened sessions)."""

    def __init__(self, url: str) -> None:
        import websocket

        self.ws, self.next_id, self.events = websocket.create_connection(url, timeout=30, suppress_origin=True), 0, []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        self.ws.send(json.dumps({**message, **({"sessionId": session} if session else {})}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def wait(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            assert time.monotonic() < deadline, f"no {method}"
            self.events.append(json.loads(self.ws.recv()))


def render(browser: str, report: Path, screenshot: Path) -> tuple[list[dict], list[list], str]:
    """Open ``report`` in headless Chromium (offline flags); return console errors, [alt, complete, width] of every
    image and the page's text as rendered (``document.body.innerText``: table cells tab-separated, one row a line)."""
    user_data = Path(tempfile.mkdtemp(prefix="chromium-profile-"))  # not next to the page: Chromium refuses those
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={user_data}",
             "--window-size=1280,900", "about:blank"]
    process = subprocess.Popen([browser, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cdp = _Cdp(_devtools(user_data))
        target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
        session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            cdp.call(domain, session)
        cdp.call("Page.navigate", session, url=report.as_uri())
        cdp.wait("Page.loadEventFired")
        probe = ("JSON.stringify([document.URL, Array.from(document.images).map(i => [i.alt, i.complete, "
                 "i.naturalWidth])])")
        url, images = json.loads(cdp.call("Runtime.evaluate", session, expression=probe)["result"]["value"])
        text = cdp.call("Runtime.evaluate", session, expression="document.body.innerText")["result"]["value"]
        assert url == report.as_uri(), f"Chromium shows {url} (an error page), not the report"
        size = cdp.call("Page.getLayoutMetrics", session)["cssContentSize"]  # the whole page, not the viewport
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = cdp.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True, clip=clip)["data"]
        screenshot.write_bytes(base64.b64decode(shot))
        errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        cdp.ws.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(user_data, ignore_errors=True)
    return errors, images, text


@pytest.mark.ray
@pytest.mark.slow
def test_report_renders_in_headless_chromium(demo_run: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (`make setup` installs it on Debian)")
    report = Path(write_report(str(demo_run), str(tmp_path / "report.html"), top=TOP).output)
    errors, images, text = render(browser, report, tmp_path / "report.png")
    assert errors == []
    lines = text.splitlines()
    evaluation = json.loads((demo_run / "evaluate-teacher" / "metrics.json").read_text())
    teacher = json.loads((demo_run / "teacher" / "model" / "model.json").read_text())
    assert "\t".join(EVAL_HEADER) in lines, text  # the metrics table's header, as shown
    assert "\t".join(_evaluation_texts("evaluate-teacher", evaluation)) in lines, text  # SRCC, KRCC, ... as shown
    assert f"\t{evaluation['srcc']:.4f}\t{evaluation['krcc']:.4f}\t" in text
    stage = next(line for line in lines if line.startswith("teacher\tteacher\t"))
    assert stage.split("\t")[2:4] == [str(teacher["step"]), f"{teacher['metrics']['val_srcc']:.4f}"]
    assert {"Metrics", "Training curves", "Predicted vs true", "Top and bottom scored images"} <= set(lines)
    assert len(images) == 2 * TOP + 3 and all(complete and width > 0 for _, complete, width in images), images
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "report.png").stat().st_size > 5000
