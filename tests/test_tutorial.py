"""The tutorial runner's limits: memory fails a run everywhere, time only under CI or when asked."""

import pytest

from tools import tutorial
from tools.tutorial import MEMORY_LIMIT_MB, TUTORIAL, RunResult


@pytest.fixture
def fake_course(monkeypatch, tmp_path):
    """`tutorial.main` over stand-in notebooks that each "take" 100 s and `peak_mb` (set by the test)."""
    ran = {}

    def run_notebook(path, out_dir, smoke, timeout, measure_imports):
        ran[path.name[:2]] = smoke
        return RunResult(path.stem, out_dir / path.name, 100.0, ran.get("peak_mb", 500.0), imports_mb=300.0)

    monkeypatch.setattr(tutorial, "run_notebook", run_notebook)
    monkeypatch.setattr(tutorial, "render_course", lambda out, **_: out / "index.html")
    monkeypatch.delenv("CI", raising=False)
    return ran


def test_over_time_warns_and_succeeds_outside_ci(fake_course, tmp_path, capsys):
    assert tutorial.main(["--out", str(tmp_path), "--time-limit", "10"]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: {100 * len(TUTORIAL)} s is over the 10 s" in out and "FAILED" not in out


@pytest.mark.parametrize("how", ["ci", "flag"])
def test_over_time_fails_under_ci_or_when_asked(fake_course, tmp_path, capsys, monkeypatch, how):
    argv = ["--out", str(tmp_path), "--time-limit", "10"]
    if how == "ci":
        monkeypatch.setenv("CI", "true")
    else:
        argv.append("--strict-time")
    assert tutorial.main(argv) == 1
    assert f"FAILED: {100 * len(TUTORIAL)} s is over the 10 s limit" in capsys.readouterr().out


def test_within_time_is_quiet_and_09_runs_at_smoke_size(fake_course, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert tutorial.main(["--out", str(tmp_path), "--time-limit", str(100 * len(TUTORIAL))]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "FAILED" not in out
    assert list(fake_course) == [f"{i:02d}" for i in range(10)]
    assert fake_course["09"] is True and not any(fake_course[p] for p in TUTORIAL if p != "09")


def test_memory_limit_fails_everywhere(fake_course, tmp_path):
    fake_course["peak_mb"] = MEMORY_LIMIT_MB + 1.0
    assert tutorial.main(["--out", str(tmp_path)]) == 1


def test_an_explicit_limit_applies_to_a_part_the_default_only_to_the_whole(fake_course, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert tutorial.main(["--out", str(tmp_path), "--only", "00", "--time-limit", "10"]) == 1
    assert "FAILED: 100 s is over the 10 s limit" in capsys.readouterr().out
    assert tutorial.main(["--out", str(tmp_path), "--only", "00", "01"]) == 0  # no default limit for a part
    assert "no time limit" in capsys.readouterr().out
