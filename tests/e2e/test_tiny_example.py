"""examples/tiny (a reduced run of the whole pipeline, bad corpora) and examples/librispeech.

* ``test_reduced_tiny_run``: ``examples/tiny/run.sh`` with ``TINY_PRESET=ci`` (a 3-minute
  corpus, a handful of updates per model, two seeds of every student) end to end:
  results.json/md/png exist, every model of the paper's table has a finite PER per seed, both
  teachers' PER is clearly below chance (the best hypothesis that ignores the audio), the claims
  table exists and agrees with the per-seed numbers and with the README's verdict rule, and
  teacher_n2 was probed layer by layer.  Run again in the same WORKDIR without matplotlib, every
  stage is skipped, results.md/json are rewritten and the plot is skipped with a message.  Under
  CI (``CI=true``, as ``.ci/run`` sets) missing espeak-ng or sox fail the test instead of skipping
  it, so the end-to-end run cannot quietly drop out of CI.  It is marked ``slow`` (about 6 minutes):
  ``make test`` leaves it out, ``make test-tiny`` runs it alone and ``.ci/run`` runs it after ``make test``.
* bad corpora (missing ``.phn``, a ``.phn`` whose line count differs from its manifest, an empty
  split): a clear message, a non-zero exit, and nothing trained.
* the LibriSpeech scripts parse (``bash -n``), and, run with stub ``dicehubert-labels``,
  ``fairseq-hydra-train`` and ``dicehubert-probe`` that record their arguments, every command
  they issue is accepted by the real CLI parsers, and every training line composes with the
  real configs (config names and overlays exist).
"""

import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from dicehubert_fairseq.probe.head import phone_error_rate
from tests.helpers.runs import install_stubs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny")
LIBRI = os.path.join(REPO, "examples", "librispeech")
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.e2e
#: the ci preset's rows, in the report's order
MODELS = ["teacher_n1", "teacher_n2", "dicehubert_narrow", "dicehubert_shallow", "feat_narrow", "scratch_narrow",
          "dicehubert_narrow_soft"]
TEACHERS = MODELS[:2]
#: the comparisons of those rows: id -> (the row the paper says is better, the other row)
CLAIMS = {"distillation": ("dicehubert_narrow", "scratch_narrow"),
          "ssl_vs_feat": ("dicehubert_narrow", "feat_narrow"),
          "narrow_vs_shallow": ("dicehubert_narrow", "dicehubert_shallow"),
          "hard_vs_soft": ("dicehubert_narrow", "dicehubert_narrow_soft"),
          "teacher_vs_student": ("teacher_n2", "dicehubert_narrow")}


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    for k in list(env):
        if k.startswith("TINY_"):
            env.pop(k)
    env.update(extra)
    return env


def run_sh(workdir, **extra):
    return subprocess.run(["bash", os.path.join(TINY, "run.sh"), str(workdir)], cwd=REPO, env=_env(**extra),
                          capture_output=True, text=True, timeout=1200)


# ------------------------------------------------------------------------- the reduced run


#: how far below chance (the best audio-independent hypothesis) the teachers' PER must be. The ci
#: preset's teachers train 8 updates, so this checks that a probe reads phones from their features
#: at all (a broken checkpoint, probe or alignment sits at chance); one CI run measured 0.883
#: against a chance of 0.931, so 0.05 failed by 0.002
CHANCE_MARGIN = 0.02


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_speech_tools():
    """Skip without espeak-ng/sox -- except in CI, where the end-to-end run must not drop out."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        msg = (f"{' and '.join(missing)} not found: needed to synthesise the corpus; the test runs once they "
               f"are on PATH (make setup installs them; under CI=true their absence is a failure)")
        if in_ci():
            pytest.fail(f"CI=true: {msg}")
        pytest.skip(msg)


def chance_per(phn_path):
    """PER of the best hypothesis that ignores the audio: one phone repeated n times, the same
    for every utterance (the empty output scores 1.0), minimised over the phone and n."""
    with open(phn_path) as f:
        refs = [line.split() for line in f.read().splitlines()]
    phones = sorted({p for r in refs for p in r})
    longest = max(len(r) for r in refs)
    return min([1.0] + [phone_error_rate(refs, [[p] * n] * len(refs)) for p in phones for n in range(1, longest + 1)])


def test_chance_per_hand_computed(tmp_path):
    path = tmp_path / "t.phn"
    path.write_text("a b a\na a\n")
    # "a a" for both: 1 deletion (b) on the first; nothing on the second -> 1/5
    assert chance_per(str(path)) == pytest.approx(1 / 5)
    path.write_text("a\nb\nc\n")
    assert chance_per(str(path)) == pytest.approx(2 / 3)


@pytest.mark.slow  # about 6 minutes: `make test-tiny` (CI runs it after `make test`) or `make test-all`
def test_reduced_tiny_run(tmp_path):
    require_speech_tools()
    work = tmp_path / "work"
    proc = run_sh(work, TINY_PRESET="ci")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for name in ("results.json", "results.md", "results.png"):
        assert (work / name).is_file() and (work / name).stat().st_size > 0, name
    with open(work / "results.json") as f:
        results = json.load(f)
    assert [m["name"] for m in results["models"]] == MODELS
    for m in results["models"]:
        # every seed's numbers, their mean and sd (teachers: the two pairs the ci preset trains)
        n = 2
        assert len(m["seeds"]) == len(set(m["seeds"])) == len(m["per_seeds"]) == len(m["valid_per_seeds"]) == n, m
        assert all(math.isfinite(p) and p >= 0 for p in m["per_seeds"] + m["valid_per_seeds"]), m
        assert m["per"] == pytest.approx(statistics.fmean(m["per_seeds"]))
        assert m["valid_per"] == pytest.approx(statistics.fmean(m["valid_per_seeds"]))
        assert m["per_std"] == (pytest.approx(statistics.stdev(m["per_seeds"])) if n > 1 else None)
        assert m["params"] > 0 and m["updates"] > 0 and m["seconds"] > 0, m
        assert len(m["layer_weights"]) == m["layers"] + 1 and abs(sum(m["layer_weights"]) - 1) < 1e-4, m
    by = {m["name"]: m for m in results["models"]}
    check_claims(results, by)
    # each seed is a separately trained student (seed, seed + 1), on its own teacher pair (seeds 1000, 1001)
    assert by["feat_narrow"]["seeds"] == [1, 2] and (work / "models" / "feat_narrow.s2").is_dir()
    assert by["teacher_n2"]["seeds"] == [1000, 1001] and by["teacher_n2"]["teachers"] == [0, 1]
    assert by["dicehubert_narrow"]["teachers"] == [0, 1] and by["scratch_narrow"]["teachers"] == [None, None]
    assert "criterion.teacher_checkpoint=" + str(work / "models" / "teacher_n2.t2") in \
        (work / ".done" / "feat_narrow.s2.done.json").read_text()
    # the students' shapes relative to the teacher (12 x 192): narrow = same depth, half width; shallow = 1/6 depth
    t = by["teacher_n2"]
    assert by["dicehubert_narrow"]["layers"] == t["layers"] and by["dicehubert_narrow"]["dim"] * 2 == t["dim"]
    assert by["dicehubert_shallow"]["layers"] * 6 == t["layers"] and by["dicehubert_shallow"]["dim"] == t["dim"]
    assert by["dicehubert_narrow"]["params"] == by["scratch_narrow"]["params"] == by["dicehubert_narrow_soft"]["params"]
    # the teachers learned something a probe can read: clearly below chance on the test split
    chance = chance_per(str(work / "test.phn"))
    assert 0.5 < chance <= 1.0
    for name in ("teacher_n1", "teacher_n2"):
        assert by[name]["per"] <= chance - CHANCE_MARGIN, (name, by[name]["per"], chance)
    md = (work / "results.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in md
    for c in results["claims"]:
        assert f"| {c['claim']} | {c['better']} " in md and f"**{c['verdict']}**" in md, c
    # teacher_n2's hidden states probed one at a time, the best chosen on valid
    layers = results["teacher_layers"]["teacher_n2"]
    assert [r["layer"] for r in layers["layers"]] == [0, 1, 6, 12]  # the ci preset's TINY_LAYER_PROBE_LAYERS
    assert layers["best_layer"] == min(layers["layers"], key=lambda r: r["valid_per"])["layer"]
    # the time of every stage is measured and printed
    assert set(results["timing"]) == {"corpus", "labels", "teachers", "students", "probes"}
    assert "time per stage:" in proc.stdout and "time per kind of job" in proc.stdout
    for stage in ("corpus", "training", "report", "total"):
        assert f"  {stage} " in proc.stdout, stage
    # the stages say what they do
    for stage in ("1/4 corpus", "2/4", "3/4 report", "start  teacher_n1", "done   probe_scratch_narrow"):
        assert stage in proc.stdout, stage
    # the last stage exports the distilled narrow student to transformers and says its size
    hf = work / "export" / "dicehubert_narrow_hf"
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert "4/4 export" in proc.stdout and "parameters:" in proc.stdout and "on disk:" in proc.stdout
    # soft labels were dumped and used
    assert glob.glob(str(work / "labels" / "it2" / "train.km.soft*"))
    assert glob.glob(str(work / "labels" / "it2.t2" / "train.km.soft*"))

    # a second run in the same WORKDIR skips every stage; without matplotlib (a stand-in
    # package that fails to import) it says so before any work, then writes everything but the plot
    hide = tmp_path / "no_matplotlib"
    (hide / "matplotlib").mkdir(parents=True)
    (hide / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    os.unlink(work / "results.json")
    again = run_sh(work, TINY_PRESET="ci", PYTHONPATH=str(hide))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "] start  " not in again.stdout and "skip   teacher_n1" in again.stdout  # no job started again
    assert "using the corpus already in" in again.stdout
    note = again.stdout.index("note: matplotlib is not installed")
    assert note < again.stdout.index("1/4 corpus"), again.stdout[:2000]
    assert "results.png skipped: matplotlib is not installed" in again.stdout
    assert "pip install -e '.[plot]'" in again.stdout
    assert (work / "results.json").is_file() and (work / "results.md").is_file()
    assert not (work / "results.png").exists()


def check_claims(results, by):
    """The claims entries exist and follow from the per-seed numbers by the stated rule: pairs by
    seed (a teacher: the student's own teacher pair), t intervals, Holm over the claims."""
    from scipy.stats import t

    assert {c["id"]: (c["better"], c["worse"]) for c in results["claims"]} == CLAIMS
    assert "Holm" in results["verdict_rule"] and "Welch" in results["verdict_rule"]
    for c in results["claims"]:
        b, w = by[c["better"]], by[c["worse"]]
        assert c["better_mean"] == b["per"] and c["worse_mean"] == w["per"], c
        if b["name"] in TEACHERS:  # each student seed against the teacher pair it learned from
            tv = dict(zip(b["teachers"], b["per_seeds"]))
            diffs = [p - tv[tt] for p, tt in zip(w["per_seeds"], w["teachers"])]
        else:
            bs, ws = dict(zip(b["seeds"], b["per_seeds"])), dict(zip(w["seeds"], w["per_seeds"]))
            diffs = [ws[s] - bs[s] for s in sorted(set(bs) & set(ws))]
        assert c["n"] == len(diffs) == 2 and c["diffs"] == pytest.approx(diffs), c
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        half = t.ppf(0.975, len(diffs) - 1) * se
        assert c["mean_diff"] == pytest.approx(mean) and c["se"] == pytest.approx(se)
        assert c["ci95"] == pytest.approx([mean - half, mean + half])
        assert c["rel_diff"] == pytest.approx(mean / w["per"])
        assert c["welch"]["mean_diff"] == pytest.approx(w["per"] - b["per"])
        assert c["valid"]["n"] == 2 and "verdict" in c["valid"]
    family = [c for c in results["claims"] if c["kind"] == "claim"]
    assert {c["id"] for c in family} == set(CLAIMS) - {"teacher_vs_student"}
    ranked = sorted(family, key=lambda c: c["p"])
    for i, c in enumerate(ranked):  # Holm: the i-th smallest p times (m - i), running maximum, capped at 1
        expected = max(min(1.0, (len(ranked) - j) * ranked[j]["p"]) for j in range(i + 1))
        assert c["p_holm"] == pytest.approx(expected)
        verdict = "within noise" if expected >= 0.05 else "holds" if c["mean_diff"] > 0 else "reversed"
        assert c["verdict"] == verdict, c
    ssl = next(c for c in results["claims"] if c["id"] == "ssl_vs_feat")
    assert ssl["paper_size"] == 0.21 and ssl["paper_size_verdict"] in (
        "rules out the paper's size", "consistent with the paper's size", "beyond the paper's size")


def tiny_module(monkeypatch, name):
    """examples/tiny/{name}.py imported as the scripts import each other (their directory on the path)."""
    import importlib

    monkeypatch.syspath_prepend(TINY)
    return importlib.import_module(name)


def test_layer_auto_waits_for_the_layer_probe_and_uses_its_best_transformer_layer(monkeypatch, tmp_path):
    """``--layer-it1 auto``: the k-means of teacher_n1 depends on its layer-by-layer probe, and its
    command (hence the .done key) names the best transformer layer (>= 1) that the probe wrote."""
    pipeline = tiny_module(monkeypatch, "pipeline")
    w = tmp_path / "w"
    argv = [str(w), "--teachers", "train", "--layer-it1", "auto", "--layer-it2", "3", "--layer-probes",
            "teacher_n1,teacher_n2"]
    seen = {}
    monkeypatch.setattr(pipeline.Runner, "run", lambda self: seen.update(self.jobs))  # build the jobs, run none
    assert pipeline.main(argv) == 0
    km1, dump1, km2 = seen["km_it1"], seen["labels_it1"], seen["km_it2"]
    assert "probe_teacher_n1.layers" in km1.deps and "probe_teacher_n2.layers" not in km2.deps
    assert km1.key.split("--layer ")[1].startswith("@best_layer:")  # not known before the probe ran
    assert km2.key.split("--layer ")[1].startswith("3 ")
    (w / "probe").mkdir(parents=True)
    (w / "probe" / "teacher_n1.layers.json").write_text(json.dumps({"best_layer": 0, "best_transformer_layer": 4}))
    assert km1.key.split("--layer ")[1].startswith("4 ") and dump1.key.split("--layer ")[1].startswith("4 ")
    with pytest.raises(SystemExit):
        pipeline.main([str(w), "--layer-it2", "auto", "--layer-probes", "teacher_n1"])  # n2 not probed


def _row(pers, seeds=None, kind="student", teachers=None):
    seeds = seeds or list(range(1, len(pers) + 1))
    return {"seeds": seeds, "per_seeds": pers, "valid_per_seeds": pers, "per": statistics.fmean(pers),
            "per_std": statistics.stdev(pers) if len(pers) > 1 else None, "kind": kind,
            "teachers": teachers or [0] * len(pers)}


def test_comparisons_follow_the_rule(monkeypatch):
    """report.compare on hand-made rows: a clear gain's interval lies above 0, a clear loss's below,
    a noisy one contains 0, one seed is too few; pairing removes what a seed shares; a teacher is
    paired with each student seed through the teacher that seed learned from."""
    compare = tiny_module(monkeypatch, "report").compare
    row = _row
    assert compare(row([0.40, 0.41, 0.42]), row([0.50, 0.52, 0.51]))["verdict_uncorrected"] == "holds"
    assert compare(row([0.50, 0.52, 0.51]), row([0.40, 0.41, 0.42]))["verdict_uncorrected"] == "reversed"
    noisy = compare(row([0.40, 0.50, 0.45]), row([0.46, 0.44, 0.47]))
    assert noisy["verdict_uncorrected"] == "within noise" and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    # paired: a constant gain of 0.01 with seed-to-seed spread of 0.1 is clear when paired, not unpaired
    paired = compare(row([0.30, 0.40, 0.50]), row([0.31, 0.41, 0.51]))
    assert paired["verdict_uncorrected"] == "holds" and paired["diffs"] == pytest.approx([0.01] * 3)
    assert paired["welch"]["ci95"][0] < 0 < paired["welch"]["ci95"][1]
    assert compare(row([0.4]), row([0.5]))["verdict_uncorrected"] == "too few seeds"
    teacher = compare(row([0.40], seeds=[1000], kind="teacher"), row([0.50, 0.52, 0.51]))
    assert teacher["n"] == 3 and teacher["diffs"] == pytest.approx([0.10, 0.12, 0.11])
    # two teachers: seeds 1 and 3 learned from teacher 0, seed 2 from teacher 1
    two = compare(row([0.40, 0.30], seeds=[1000, 1001], kind="teacher", teachers=[0, 1]),
                  row([0.50, 0.52, 0.51], teachers=[0, 1, 0]))
    assert two["diffs"] == pytest.approx([0.10, 0.22, 0.11])
    # only the seeds both rows have are paired
    assert compare(row([0.4, 0.5, 0.6]), row([0.5, 0.6], seeds=[2, 3]))["seeds"] == [2, 3]
    # the paper's size: 21% relative; an interval of the relative difference entirely below it rules it out
    small = compare(row([0.40, 0.41, 0.42]), row([0.41, 0.42, 0.435]), paper_size=0.21)
    assert small["paper_size_verdict"] == "rules out the paper's size"
    big = compare(row([0.30, 0.31, 0.33]), row([0.40, 0.41, 0.42]), paper_size=0.21)
    assert big["paper_size_verdict"] == "consistent with the paper's size"


def test_claims_are_corrected_for_their_number_and_the_reference_row_is_not_counted(monkeypatch):
    """Two claims with the same paired p between 0.025 and 0.05: uncorrected both hold; Holm (m = 2)
    doubles both p-values past 0.05: within noise. The teacher-vs-student reference keeps its
    uncorrected verdict and is not counted in the family."""
    report = tiny_module(monkeypatch, "report")
    base = [0.40, 0.42, 0.44, 0.41]
    d = [0.012, 0.028, 0.006, 0.016]
    p = tiny_module(monkeypatch, "stats").paired(d)["p"]
    assert 0.025 < p < 0.05  # the case this test is about
    worse = [b + x for b, x in zip(base, d)]
    models = [dict(_row([0.30], seeds=[1000], kind="teacher"), name="teacher_n2"),
              dict(_row(base), name="dicehubert_narrow"),
              dict(_row(worse), name="scratch_narrow"), dict(_row(worse), name="feat_narrow")]
    out = {c["id"]: c for c in report.claims(models)}
    assert set(out) == {"distillation", "ssl_vs_feat", "teacher_vs_student"}
    for cid in ("distillation", "ssl_vs_feat"):
        assert out[cid]["p"] == pytest.approx(p) and out[cid]["verdict_uncorrected"] == "holds"
        assert out[cid]["p_holm"] == pytest.approx(2 * p) and out[cid]["verdict"] == "within noise"
    ref = out["teacher_vs_student"]
    assert ref["kind"] == "reference" and ref["p_holm"] is None and ref["verdict"] == ref["verdict_uncorrected"]


def test_side_by_side_puts_each_runs_claims_in_its_column(monkeypatch, tmp_path, capsys):
    """report.py --side-by-side: a row per claim (first seen order), a column per run, each cell the
    run's relative difference, interval, pairs, verdicts and paper's size; a claim a run lacks is
    'not run'; a bad LABEL=JSON is refused with the path."""
    report = tiny_module(monkeypatch, "report")
    base = [0.40, 0.41, 0.42]
    models = [dict(_row([0.30], seeds=[1000], kind="teacher"), name="teacher_n2"),
              dict(_row(base), name="dicehubert_narrow"), dict(_row([0.60, 0.62, 0.61]), name="feat_narrow"),
              dict(_row([0.60, 0.62, 0.61]), name="scratch_narrow")]
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"claims": report.claims(models)}))
    b = tmp_path / "b.json"  # a run without the scratch row: no distillation claim
    b.write_text(json.dumps({"claims": report.claims([m for m in models if m["name"] != "scratch_narrow"])}))
    assert report.main(["--side-by-side", f"run A={a}", f"run B={b}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| claim (better row vs other row) | run A | run B |"
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in lines[2:])}
    ssl = rows["dicehubert_narrow vs feat_narrow"]
    rel = 100 * (statistics.fmean([0.60, 0.62, 0.61]) - statistics.fmean(base)) / statistics.fmean([0.60, 0.62, 0.61])
    assert ssl[0].startswith(f"{rel:+.1f}% [") and "n=3: **holds** (valid: holds)" in ssl[0]
    assert ssl[0].endswith("paper's size") and ssl[0] == ssl[1]
    assert rows["dicehubert_narrow vs scratch_narrow"][1] == "not run"
    assert "teacher_n2 vs dicehubert_narrow (reference)" in rows
    with pytest.raises(SystemExit):
        report.main(["--side-by-side", f"{a}"])
    assert "expected LABEL=RESULTS_JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--side-by-side", f"X={tmp_path / 'missing.json'}"])
    assert "missing.json: cannot read a results.json" in capsys.readouterr().err


def test_ci_fails_instead_of_skipping_without_speech_tools(tmp_path):
    """Without espeak-ng and sox on PATH: skipped on a workstation, a failure under CI=true."""
    outcomes = {}
    for ci in ("", "true"):
        env = _env(CI=ci, PATH=BIN)  # the project's environment only: no /usr/bin/espeak-ng, sox
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", REPO,
                               "--runslow", f"{__file__}::test_reduced_tiny_run", "-rsf"], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=300)
        outcomes[ci] = (proc.returncode, proc.stdout)
    code, out = outcomes[""]
    assert code == 0 and "1 skipped" in out and "espeak-ng and sox not found" in out, out[-2000:]
    code, out = outcomes["true"]
    assert code == 1 and "1 failed" in out and "CI=true: espeak-ng and sox not found" in out, out[-2000:]


_STUB_PYTHON = """#!/usr/bin/env bash
# stands in for python: records each call; synth_corpus.py writes a corpus, report.py a results.json
echo "$*" >> "$STUB_LOG"
script="$(basename "$1")"; shift
case "$script" in
  synth_corpus.py) out="$2"; mkdir -p "$out"
    for s in train valid test; do echo x > "$out/$s.tsv"; echo a > "$out/$s.phn"; done; echo {} > "$out/corpus.json" ;;
  report.py) echo '{"claims": []}' > "$1/results.json"; echo table > "$1/results.md" ;;
esac
"""


def test_experiments_sh_budget_series_runs_narrow_and_shallow_at_three_budgets(tmp_path):
    """experiments.sh budget_{400,1600,3200}_A: each synthesises corpus A once (make tiny's command),
    runs pipeline.py on a copy of it with the narrow and shallow rows, 3 seeds and its own budget,
    then report.py, and copies the results to EXP_OUT/NAME.json; an unknown name is refused."""
    stub = tmp_path / "python"
    stub.write_text(_STUB_PYTHON)
    stub.chmod(0o755)
    log, out, root = tmp_path / "calls.log", tmp_path / "out", tmp_path / "root"
    names = ["budget_400_A", "budget_1600_A", "budget_3200_A"]
    listed = subprocess.run(["bash", os.path.join(TINY, "experiments.sh"), "list"], capture_output=True, text=True)
    assert set(names) <= set(listed.stdout.split())
    env = _env(PYTHON=str(stub), STUB_LOG=str(log), EXP_ROOT=str(root), EXP_OUT=str(out))
    proc = subprocess.run(["bash", os.path.join(TINY, "experiments.sh"), *names], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    synth = [c for c in calls if "synth_corpus.py" in c]
    assert len(synth) == 1 and "--minutes 12 --seed 1" in synth[0]  # corpus A, once
    pipelines = [c.split() for c in calls if "pipeline.py" in c]
    assert [p[1] for p in pipelines] == [str(root / n) for n in names]
    for argv, updates in zip(pipelines, (400, 1600, 3200)):
        opts = dict(zip(argv[2::2], argv[3::2]))
        assert opts == {"--rows": "dicehubert_narrow,dicehubert_shallow", "--replicas": "3",
                        "--student-updates": str(updates)}, argv
        assert (root / argv[1].rsplit("/", 1)[1] / "train.phn").is_file()  # the corpus was copied in
    for n in names:
        assert json.loads((out / f"{n}.json").read_text()) == {"claims": []}
    bad = subprocess.run(["bash", os.path.join(TINY, "experiments.sh"), "budget_9_A"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown experiment 'budget_9_A'" in bad.stderr

# ------------------------------------------------------------------------- bad corpora


@pytest.fixture
def corpus(tmp_path):
    """A valid small corpus (random audio) with .phn transcripts in ``tmp_path/work``."""
    from tests.helpers.data import write_corpus

    work = tmp_path / "work"
    sizes = write_corpus(str(work), {"train": 3, "valid": 2, "test": 2})
    for split, lens in sizes.items():
        (work / f"{split}.phn").write_text("".join("h @ l oU\n" for _ in lens))
    return work


def _assert_refused(proc, work, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "nothing was trained" in proc.stderr
    # before any training: no labels, models or logs
    for d in ("labels", "models", "logs", "km"):
        assert not (work / d).exists(), d


def test_missing_phn(corpus):
    os.unlink(corpus / "valid.phn")
    _assert_refused(run_sh(corpus), corpus, f"{corpus / 'valid.phn'}: phone transcripts not found")


def test_phn_line_count_differs_from_manifest(corpus):
    (corpus / "train.phn").write_text("h @ l oU\n" * 5)
    _assert_refused(run_sh(corpus), corpus, f"{corpus / 'train.phn'}: 5 lines", "lists 3 utterances")


def test_empty_split(corpus):
    root = (corpus / "test.tsv").read_text().splitlines()[0]
    (corpus / "test.tsv").write_text(root + "\n")
    (corpus / "test.phn").write_text("")
    proc = run_sh(corpus)
    _assert_refused(proc, corpus, f"{corpus / 'test.tsv'}: ")
    line = next(x for x in proc.stderr.splitlines() if f"{corpus / 'test.tsv'}: " in x)
    assert "no audio" in line or "is empty" in line, line


def test_missing_manifest(corpus):
    os.unlink(corpus / "valid.tsv")
    _assert_refused(run_sh(corpus), corpus, f"{corpus / 'valid.tsv'}: manifest not found")


# ------------------------------------------------------------------------- examples/librispeech

LIBRI_SCRIPTS = sorted(glob.glob(os.path.join(LIBRI, "*.sh")))


def test_librispeech_scripts_exist_and_parse():
    names = [os.path.basename(p) for p in LIBRI_SCRIPTS]
    assert names == ["1_manifests.sh", "2_labels.sh", "3_train.sh", "4_probe.sh", "5_superb.sh", "env.sh"]
    for path in LIBRI_SCRIPTS:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)
        if not path.endswith("env.sh"):
            assert "set -euo pipefail" in open(path).read(), path


@pytest.fixture(scope="module")
def libri_calls(tmp_path_factory):
    """Run the LibriSpeech scripts with stub CLIs on an empty fake corpus; their recorded argv."""
    tmp = tmp_path_factory.mktemp("libri")
    stubs = install_stubs(tmp / "bin", ("dicehubert-labels", "fairseq-hydra-train", "dicehubert-probe"))
    ls = tmp / "LibriSpeech"
    for subset in ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean"):
        (ls / subset).mkdir(parents=True)
    log = tmp / "calls.jsonl"
    env = _env(STUB_LOG=str(log), LIBRISPEECH=str(ls), TEACHER=str(tmp / "hubert_base_ls960.pt"),
               WORK=str(tmp / "work"), NGPU="2")
    env["PATH"] = str(stubs) + os.pathsep + env["PATH"]
    rows = ["dicehubert_narrow", "dicehubert_narrow_soft", "dicehubert_shallow_l6", "dicehubert_shallow_l4",
            "feat_narrow", "feat_shallow_l6", "feat_shallow_l4", "scratch_narrow", "hubert_base_scratch"]
    commands = [["1_manifests.sh"], ["2_labels.sh"]] + [["3_train.sh", r] for r in rows] + [
        ["3_train.sh", "dicehubert_narrow", "run=slurm"], ["4_probe.sh", str(tmp / "work/runs/x/checkpoints/c.pt")]]
    for cmd in commands:
        proc = subprocess.run(["bash", os.path.join(LIBRI, cmd[0])] + cmd[1:], cwd=str(tmp), env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    # the manifests step ran fairseq's real wav2vec_manifest.py
    assert (tmp / "work" / "manifests" / "train.tsv").is_file() and (tmp / "work" / "manifests" / "valid.tsv").is_file()
    with open(log) as f:
        return [json.loads(line) for line in f]


def test_librispeech_label_and_probe_commands_are_supported(libri_calls):
    from dicehubert_fairseq.labels.cli import build_parser as labels_parser
    from dicehubert_fairseq.probe.cli import build_parser as probe_parser

    seen = set()
    for argv in libri_calls:
        tool, args = argv[0], argv[1:]
        if tool == "dicehubert-labels":
            ns = labels_parser().parse_args(args)  # SystemExit (test error) on an unknown option
            seen.add(ns.command)
            if ns.command == "dump" and ns.nshard > 1:
                assert 0 <= ns.rank < ns.nshard
        elif tool == "dicehubert-probe":
            probe_parser().parse_args(args)
            seen.add("probe")
    assert {"fit", "dump", "merge", "check", "probe"} <= seen, seen
    # the paper's K = 100 for the teacher's k-means (and HuBERT iteration 1's K = 100 for MFCC)
    fits = [labels_parser().parse_args(argv[1:]) for argv in libri_calls if argv[:2] == ["dicehubert-labels", "fit"]]
    assert sorted((bool(ns.mfcc), ns.n_clusters) for ns in fits) == [(False, 100), (True, 100)]


def test_librispeech_k500_is_an_override(tmp_path):
    """``K=500 2_labels.sh``: fairseq's HuBERT iteration-2 setting for the teacher's k-means."""
    from dicehubert_fairseq.labels.cli import build_parser as labels_parser

    stubs = install_stubs(tmp_path / "bin", ("dicehubert-labels",))
    log = tmp_path / "calls.jsonl"
    env = _env(STUB_LOG=str(log), WORK=str(tmp_path / "work"), NGPU="1", K="500", STAGES="fit",
               TEACHER=str(tmp_path / "hubert_base_ls960.pt"))
    env["PATH"] = str(stubs) + os.pathsep + env["PATH"]
    proc = subprocess.run(["bash", os.path.join(LIBRI, "2_labels.sh")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    ns = labels_parser().parse_args(calls[0][1:])
    assert len(calls) == 1 and ns.command == "fit" and ns.n_clusters == 500 and ns.out.endswith("l9_k500.joblib")


def test_librispeech_training_lines_compose(libri_calls):
    from tests.helpers.config import compose

    lines = [a[1:] for a in libri_calls if a[0] == "fairseq-hydra-train"]
    assert len(lines) == 10
    for args in lines:
        assert args[:2] == ["--config-dir", "config/"] and args[2] == "--config-name", args
        name, overrides = args[3], [o for o in args[4:] if o != "-m"]
        assert os.path.isfile(os.path.join(REPO, "config", f"{name}.yaml")), name
        assert "common.user_dir=dicehubert_fairseq" in overrides
        for o in overrides:  # overlays (group=option) exist
            group, _, option = o.partition("=")
            if "." not in group and not group.startswith("+"):
                assert os.path.isfile(os.path.join(REPO, "config", group, f"{option}.yaml")), o
        cfg = compose(name, [o for o in overrides if not o.startswith("hydra.")])
        assert cfg.task.data.endswith("manifests")
        if cfg.criterion._name == "dicehubert_feat":
            assert cfg.criterion.teacher_checkpoint.endswith("hubert_base_ls960.pt")
        else:
            assert cfg.task.label_dir.endswith("labels")


def test_librispeech_readme_names_existing_configs():
    import re

    # the table rows and the command lines (the prose also names the model, `dicehubert_student`)
    text = "\n".join(line for line in open(os.path.join(LIBRI, "README.md")).read().splitlines()
                     if line.startswith("|") or "3_train.sh" in line)
    rows = set(re.findall(r"`((?:dicehubert|feat|scratch|hubert_base)_[a-z0-9_]+)`", text))
    rows |= set(re.findall(r"3_train\.sh ((?:dicehubert|feat|scratch|hubert_base)_[a-z0-9_]+)", text))
    assert {"dicehubert_narrow", "feat_narrow", "scratch_narrow"} <= rows
    for row in rows:
        assert os.path.isfile(os.path.join(REPO, "config", f"{row}.yaml")), row
    for group, option in re.findall(r"\b(data|run|model)=([a-z0-9_]+)", text):
        assert os.path.isfile(os.path.join(REPO, "config", group, f"{option}.yaml")), (group, option)
