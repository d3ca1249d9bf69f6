"""benchmarks/labels/compare.py: each run's ratios to fairseq's figures of the same run, medians
over runs, and a clear error for a directory that holds no finished benchmark."""

import json

import pytest

from benchmarks.labels.compare import main, measure


def _steps(**walls_rss):
    return {name: {"wall_s": w, "cpu_s": w, "peak_rss_mb": rss} for name, (w, rss) in walls_rss.items()}


def _write_run(d, fairseq_wall, fit_wall, run_wall, rss=1000.0):
    d.mkdir()
    fs = {"wall_s": fairseq_wall, "cpu_s": 2 * fairseq_wall,
          "steps": _steps(dump_hubert_feature=(fairseq_wall, 2000.0), learn_kmeans=(1.0, 700.0))}
    ours = {"wall_s": fit_wall, "cpu_s": fit_wall, "steps": _steps(fit=(1.0, rss - 10), dump=(fit_wall, rss))}
    run = {"wall_s": run_wall, "cpu_s": run_wall, "steps": _steps(run=(run_wall, rss))}
    small = {"utterances": 10, "fairseq": fs, "ours": ours, "ours_run": run,
             "objective": {"fairseq": 9.0, "ours": 9.5, "ours_run": 9.5}}
    large = dict(small, utterances=40)
    (d / "results.json").write_text(json.dumps({"info": {}, "results": [small, large]}))
    return str(d)


def test_ratios_are_to_fairseq_of_the_same_run_and_medians_over_runs(tmp_path, capsys):
    a = _write_run(tmp_path / "a", fairseq_wall=40.0, fit_wall=20.0, run_wall=10.0)
    b = _write_run(tmp_path / "b", fairseq_wall=80.0, fit_wall=60.0, run_wall=40.0, rss=1200.0)
    c = _write_run(tmp_path / "c", fairseq_wall=50.0, fit_wall=35.0, run_wall=30.0)
    m = measure(a)
    assert m["ours"]["wall_vs_fairseq"] == pytest.approx(0.5) and m["ours_run"]["cpu_vs_fairseq"] == pytest.approx(0.125)
    assert m["ours"]["peak_rss_mb"] == 1000.0 and m["ours"]["rss_vs_fairseq"] == pytest.approx(0.5)
    assert m["ours"]["utterances"] == 40  # the run's largest corpus
    out = tmp_path / "out.json"
    assert main([f"one={a}", f"three={a},{b},{c}", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    fit3 = next(line for line in lines if line.startswith("| three | fit + dump |"))
    assert "| 3 | 0.70 (0.50, 0.75, 0.70) |" in fit3  # median of 20/40, 60/80, 35/50
    assert "| 1000 (1000, 1200, 1000) |" in fit3
    assert len(json.loads(out.read_text())["three"]) == 3


def test_a_directory_without_results_is_refused_with_its_path(tmp_path, capsys):
    with pytest.raises(SystemExit, match="empty/results.json: not a finished benchmarks.labels.run"):
        main([f"x={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit):
        main(["no-label-here"])
    assert "expected LABEL=WORKDIR" in capsys.readouterr().err
