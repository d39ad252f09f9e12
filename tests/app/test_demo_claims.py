"""The demo's final table: one row per model, one row per claim of the paper, with its measured gap."""

from __future__ import annotations

from cskd_ray.app.demo import arm_folder, claims_table


def _m(srcc: float, rate: float) -> dict:
    return {"srcc": srcc, "plcc": srcc, "accuracy": 0.6, "images_per_s": rate}


def test_claims_rows_say_whether_each_claim_holds() -> None:
    table = claims_table({"teacher": _m(0.6, 50), "cskd": _m(0.5, 200), "aligned_only": _m(0.3, 200),
                          "labels_only": _m(0.4, 200)})
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert lines["(a) aligned student beats the same student not aligned"].split()[-2:] == ["-0.100", "NO"]
    assert lines["(b) CSKD student beats the labels-only student"].split()[-2:] == ["+0.100", "yes"]
    assert lines["(c) teacher beats every student"].split()[-2:] == ["+0.100", "yes"]
    assert lines["(d) student is N times faster than the teacher (forward img/s)"].split()[-2:] == ["4.0x", "yes"]
    assert [arm_folder(a) for a in ("teacher", "cskd", "labels_only")] == ["teacher", "student", "student-labels-only"]
