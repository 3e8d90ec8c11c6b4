"""The pre-registered study's analysis (benchmarks/study.py, docs/study.md) on hand-made results: H1 non-inferiority
with Holm over two sparsities, H2/H3 as one Holm family, the labelled run paired with the label-free controls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from benchmarks.study import analyse, by_replicate, markdown

CTRL = [75.0, 75.4, 74.8, 75.2, 75.1]


def _trials(offset: dict, scorer="align_uniform", combine="gradient", normalize="none") -> list[dict]:
    return [{"trial": f"s{s}_{scorer}_{combine}_{normalize}_rep{r}", "status": "done", "sparsity": s, "scorer": scorer,
             "combine": combine, "normalize": normalize, "replicate": r, "test/avg": CTRL[r] + off[r]}
            for s, off in offset.items() for r in range(5)]


def _labelfree() -> list[dict]:
    rows = _trials({0.0: [0.0] * 5})
    rows += _trials({0.02: [0.1, 0.2, -0.1, 0.3, 0.0], 0.1: [-0.2, -0.4, -0.1, -0.3, -0.2]})
    rows += _trials({0.02: [-1.0, -1.5, -0.8, -1.2, -1.1], 0.1: [-2.0, -2.5, -1.8, -2.2, -2.1]}, scorer="random")
    rows += _trials({0.02: [-0.5] * 5, 0.1: [-1.0] * 5}, scorer="magnitude")
    return rows


def test_the_primary_cell_by_hand():
    res = analyse(_labelfree(), _trials({0.02: [0.0] * 5, 0.1: [0.0] * 5}), [0.02, 0.1])
    rows = res["t"]["primary"]["rows"]
    two, ten = rows
    assert two["control"] == pytest.approx(np.mean(CTRL)) and two["n"] == 5
    # H1 at 2 %: d + 0.5 = (0.6, 0.7, 0.4, 0.8, 0.5) → one-sided t; Holm over the two H1 tests
    d2, d10 = np.array([0.1, 0.2, -0.1, 0.3, 0.0]) + 0.5, np.array([-0.2, -0.4, -0.1, -0.3, -0.2]) + 0.5
    p2 = sps.ttest_1samp(d2, 0, alternative="greater").pvalue
    p10 = sps.ttest_1samp(d10, 0, alternative="greater").pvalue
    lo, hi = sorted([p2, p10])
    holm = {p2: min(1, 2 * lo) if p2 == lo else max(2 * lo, hi), p10: min(1, 2 * lo) if p10 == lo else max(2 * lo, hi)}
    assert two["H1"]["p_raw"] == pytest.approx(p2) and two["H1"]["p"] == pytest.approx(holm[p2])
    assert ten["H1"]["p"] == pytest.approx(holm[p10]) and two["H1"]["passed"] and ten["H1"]["passed"]
    # H2/H3: four two-sided paired t-tests, one Holm family
    assert two["H2"]["p_raw"] == pytest.approx(sps.ttest_rel(CTRL + np.array([0.1, 0.2, -0.1, 0.3, 0.0]),
                                                             CTRL + np.array([-1.0, -1.5, -0.8, -1.2, -1.1])).pvalue)
    assert two["H2"]["family"] == 4 and two["H2"]["verdict"] == "better"
    assert "| 2% | 5 |" in markdown(res)
    # the exact sensitivity analysis cannot go below 2/32 two-sided at n = 5: nothing is credited there
    assert res["exact"]["primary"]["rows"][0]["H2"]["p_raw"] == pytest.approx(0.0625)
    assert res["exact"]["primary"]["rows"][0]["H2"]["verdict"] == "within noise"


def test_the_labelled_cell_pairs_with_the_labelfree_controls():
    labelled = _trials({0.02: [0.5] * 5, 0.1: [0.6, 0.4, 0.5, 0.7, 0.5]})
    res = analyse(_labelfree(), labelled, [0.02, 0.1])
    row = res["t"]["labelled"]["rows"][0]
    assert row["mean"] == pytest.approx(np.mean(CTRL) + 0.5) and row["random"] == pytest.approx(np.mean(CTRL) - 1.12)
    assert row["H3"]["diff"] == pytest.approx(0.5)
    assert by_replicate(labelled, sparsity=0.1)[3] == pytest.approx(CTRL[3] + 0.7)


def _per_replicate_config(r: int, path: str = "sweeps/study-labelfree.yaml"):
    from sparsecse.core.config import load_config

    return load_config(path, ["sweep.replicates=1", f"train.seed={42 + r}",
                                                       f"sweep.seeds=[{1 + 1000 * r}]"])


@pytest.mark.parametrize("path, per_replicate", [("sweeps/study-labelfree.yaml", 31), ("sweeps/study-labelled.yaml", 11)])
def test_one_run_per_replicate_computes_what_the_five_replicate_run_does(monkeypatch, path, per_replicate):
    """docs/study.md, Deviations: the study runs one sweep per replicate; each must train stage 1, score and
    retrain exactly as replicate r of the pre-registered five-replicate sweep (same seeds, same grid)."""
    from pathlib import Path

    from sparsecse.core.config import load_config
    from sparsecse.core.results import grid_points
    from sparsecse.run.rundir import replicate_config

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    whole = load_config(path)
    assert whole.sweep.replicates == 5
    pts = grid_points(whole)
    for r in range(5):
        one = _per_replicate_config(r, path)
        assert replicate_config(whole, r).to_dict()["train"] == one.to_dict()["train"]
        assert whole.to_dict()["score"] == one.to_dict()["score"]
        key = lambda p: (p.sparsity, p.lam, p.scorer, p.combine, p.normalize, p.run_seed)  # noqa: E731
        mine = sorted(key(p) for p in grid_points(one))
        assert mine == sorted(key(p) for p in pts if p.replicate == r) and len(mine) == per_replicate


def test_the_analysis_reads_per_replicate_runs_as_the_five_replicate_run(tmp_path):
    import json

    from benchmarks.study import _load, replicate_of

    whole = _labelfree()
    split = [{**t, "replicate": 0, "seed": 1 + 1000 * t["replicate"], "trial": t["trial"].split("_rep")[0]}
             for t in whole]
    files = []
    for r in range(5):
        files.append(tmp_path / f"rep{r}.json")
        files[-1].write_text(json.dumps({"trials": [t for t in split if t["seed"] // 1000 == r]}))
    merged = _load(",".join(map(str, files)))
    assert sorted(replicate_of(t) for t in merged) == sorted(t["replicate"] for t in whole)
    assert analyse(merged, merged, [0.02, 0.1]) == analyse(whole, whole, [0.02, 0.1])
    assert by_replicate(merged, sparsity=0.1, scorer="random")[4] == pytest.approx(CTRL[4] - 2.1)


def test_the_replicate_runner_runs_each_remaining_replicate_with_its_seeds(tmp_path):
    """benchmarks/study_replicates.sh --dry-run: one sweep per (scoring, replicate) not yet in docs/study-results/,
    each with the --set overrides that make it replicate r of the five-replicate sweep (checked above)."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    from sparsecse.core.config import load_config

    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "repo"  # a copy of the script beside its own results folder, so the test does not depend on
    (copy / "benchmarks").mkdir(parents=True)  # how many replicates the real docs/study-results/ holds
    (copy / "benchmarks" / "study_replicates.sh").write_text((repo / "benchmarks" / "study_replicates.sh").read_text())
    (copy / "docs" / "study-results").mkdir(parents=True)
    done = {"labelfree-rep0", "labelled-rep0", "labelled-rep2"}
    for name in done:
        (copy / "docs" / "study-results" / f"{name}.json").write_text("{}")
    env = {**os.environ, "STUDY_CLONE": str(tmp_path), "RUNS": str(tmp_path / "runs")}
    out = subprocess.run(["bash", str(copy / "benchmarks" / "study_replicates.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    order = [f"{k}-rep{r}" for r in range(5) for k in ("labelfree", "labelled") if f"{k}-rep{r}" not in done]
    assert [line.split("--out ")[1].split()[0].rsplit("study-", 1)[1] for line in out] == order and len(out) == 7
    assert not (tmp_path / "runs").exists()
    for line in out:
        args = shlex.split(line)
        kind, r = args[args.index("--out") + 1].rsplit("study-", 1)[1].split("-rep")
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        assert f"{kind}-rep{r}" not in done and args[4] == f"sweeps/study-{kind}.yaml"
        got = load_config(repo / args[4], sets).to_dict()
        want = _per_replicate_config(int(r), str(repo / args[4])).to_dict()
        assert got["train"] == want["train"] and got["sweep"] == want["sweep"]
        assert got["eval"]["transfer"] == ("selected" if r == "0" else "none")


def test_the_leak_free_row_and_each_run_s_selection_and_transfer(tmp_path, capsys):
    """SICK-R alone for the primary comparison (hand-computed mean difference and t interval), and each
    per-replicate run's selection, failures and transfer read from its own results file, through main()."""
    import json

    from benchmarks.study import main

    sick = [0.3, -0.1, 0.2, 0.4, 0.0]
    free = [{**t, "test/SICKRelatedness": 70.0 + t["replicate"] + (sick[t["replicate"]] if t["sparsity"] == 0.02
                                                                 and t["scorer"] == "align_uniform" else 0.0)}
            for t in _labelfree()]
    files = {}
    for kind, trials in (("free", free), ("lab", _trials({0.02: [0.5] * 5, 0.1: [0.6] * 5}))):
        files[kind] = []
        for r in range(5):
            run = {"trials": [t for t in trials if t["replicate"] == r], "failed": [], "transfer": {},
                   "control": {"test": {"avg": CTRL[r]}},
                   "selected": {"rule": "noninferior", "control_won": r == 1, "sparsity": 0.1, "method": "sparsecse",
                                "combine": "gradient", "normalize": "none", "test": {"avg": CTRL[r] - 0.2},
                                "rule_detail": {"why": "sparsest within the margin"}}}
            if kind == "free" and r == 0:
                run["transfer"] = {"SimCSE": {"avg": 77.5, "CR": 80.0}, "SparseCSE": {"avg": 77.25}}
                run["failed"] = [{"trial": "s0.3_random_rep0", "error": "boom"}]
            files[kind].append(tmp_path / f"{kind}{r}.json")
            files[kind][-1].write_text(json.dumps(run))
    out = tmp_path / "study.json"
    assert main([",".join(map(str, files["free"])), ",".join(map(str, files["lab"])), "--sparsities", "0.02", "0.1",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    two = res["leak_free"][0]
    half = sps.t.ppf(0.975, 4) * np.std(sick, ddof=1) / np.sqrt(5)
    assert two["diff"] == pytest.approx(np.mean(sick)) and two["lo"] == pytest.approx(np.mean(sick) - half)
    assert res["leak_free"][1]["diff"] == pytest.approx(0.0) and len(res["runs"]) == 10
    md = capsys.readouterr().out
    assert "| 2% | 5 | 72.16 | 72.00 | +0.16 [" in md
    assert ("label-free replicate 0: rule noninferior chose sparsecse gradient/none at 10% — test 74.80 against the "
            "control's 75.00; failed: s0.3_random_rep0; transfer avg SimCSE 77.50, SparseCSE 77.25") in md
    assert "label-free replicate 1: rule noninferior chose control (s = 0)" in md
    assert "labelled replicate 4: rule noninferior chose sparsecse" in md


def test_study2_runs_one_sweep_per_replicate_each_replicate_r_of_the_preregistered_config(tmp_path):
    """docs/study2.md: `STUDY=study2 benchmarks/study_replicates.sh` runs sweeps/study2.yaml once per replicate not
    yet in docs/study2-results/, each exactly replicate r of the five-replicate config (the same stage-1 seed, the
    same retraining seeds — the control's three included — the same grid), with the default selection."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    from sparsecse.core.config import load_config
    from sparsecse.core.results import grid_points
    from sparsecse.run.rundir import replicate_config

    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "repo"
    (copy / "benchmarks").mkdir(parents=True)
    (copy / "benchmarks" / "study_replicates.sh").write_text((repo / "benchmarks" / "study_replicates.sh").read_text())
    (copy / "docs" / "study2-results").mkdir(parents=True)
    (copy / "docs" / "study2-results" / "rep1.json").write_text("{}")
    env = {**os.environ, "STUDY": "study2", "STUDY_CLONE": str(tmp_path), "RUNS": str(tmp_path / "runs")}
    out = subprocess.run(["bash", str(copy / "benchmarks" / "study_replicates.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [shlex.split(x)[shlex.split(x).index("--out") + 1].rsplit("/", 1)[1] for x in out] == [
        "study2-rep0", "study2-rep2", "study2-rep3", "study2-rep4"]
    whole = load_config(repo / "sweeps" / "study2.yaml")
    assert (whole.sweep.replicates, whole.sweep.select, whole.sweep.select_on, whole.sweep.control_seeds) == (
        5, "safe", "clean-dev", 2)
    key = lambda p: (p.sparsity, p.lam, p.scorer, p.combine, p.normalize, p.run_seed)  # noqa: E731
    for line in out:
        args = shlex.split(line)
        r = int(args[args.index("--out") + 1].rsplit("-rep", 1)[1])
        one = load_config(repo / args[4], [args[i + 1] for i, a in enumerate(args) if a == "--set"])
        assert replicate_config(whole, r).to_dict()["train"] == one.to_dict()["train"]
        mine = sorted(key(p) for p in grid_points(one))
        assert mine == sorted(key(p) for p in grid_points(whole) if p.replicate == r) and len(mine) == 6


def _study2_run(r: int, choice: str, sick: dict, avg: dict, rules: dict) -> dict:
    """A results.json of one study-2 replicate: controls c1–c3 and points at 2/10/30 % (trial names as keys)."""
    from sparsecse.core.results import metric_key

    trials = []
    for name, s in (("c1", 0.0), ("c2", 0.0), ("c3", 0.0), ("p2", 0.02), ("p10", 0.1), ("p30", 0.3)):
        trials.append({"trial": name, "sparsity": s, "status": "done", metric_key("test", "SICKRelatedness"): sick[name],
                       metric_key("test", "avg"): avg[name], metric_key("choice", "all"): 70.0 + sick[name] / 10})
    t = {"diff": -0.9, "se": 0.4, "se_pairs": 0.3, "seed_sd": 0.2, "n_point": 1, "n_control": 3, "pairs": 240,
         "lower": -1.56, "passed": False}  # the safe rule's recorded test at 2 %: beyond the margin on SICK
    steps = [{"sparsity": 0.02, "passed": False, "sources": {"sickr-dev": t, "stsb-dev": {**t, "diff": -0.1}}}]
    sel = {"sparsity": next(t["sparsity"] for t in trials if t["trial"] == choice), "trial": choice,
           "rule_detail": {"why": "because", "steps": steps if r == 0 else []}}
    return {"trials": trials, "selected": sel, "rules": rules}


def test_study2_analysis_by_hand(tmp_path, capsys):
    import json

    from benchmarks.study2 import main

    base = {"c1": 60.0, "c2": 61.0, "c3": 62.0, "p2": 61.2, "p10": 60.0, "p30": 55.0}  # control mean 61
    for r in range(5):
        choice = "p2" if r < 3 else ("c1" if r == 3 else "p30")  # replicate 4 picks 30 %: beyond the margin
        rules = {"noninferior": {"sparsity": 0.3, "trial": "p30"}, "best_dev": {"sparsity": 0.1, "trial": "p10"}}
        (tmp_path / f"rep{r}.json").write_text(json.dumps(_study2_run(r, choice, base, {k: v + 10 for k, v in
                                                                                         base.items()}, rules)))
    assert main([str(tmp_path), "--json", str(tmp_path / "out.json")]) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    # default: p2 (+0.2) ×3, c1 (−1.0, beyond) ×1, p30 (−6) ×1 → within in 3 of 5: H does not hold; pruned 4 of 5
    assert res["H"] == {"within": 3, "of": 5, "holds": False} and res["pruned"] == 4
    old = [c for c in res["choices"] if c["rule"] == "noninferior"]
    assert all(c["d_sick"] == -6.0 and not c["within"] for c in old)
    p30 = next(p for p in res["per_sparsity"] if p["sparsity"] == 0.3)
    assert p30["d_sick"]["mean"] == -6.0 and p30["d_sick"]["lo"] == p30["d_sick"]["hi"] == -6.0
    assert res["control_sd"]["test/SICKRelatedness"] == 1.0 and res["tracking"]["rho"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "3 of 5 — does not hold; the default pruned in 4 of 5" in out
    # the post-hoc diagnosis of replicate 0's refusal: SICK worse, STS-B within but not shown
    assert list(res["refusals"]) == ["0"] and "- replicate 0: at 2%: on sickr-dev: -0.90 against the control, " \
        "beyond the margin" in out and "on stsb-dev: -0.10 against the control, within the margin but not shown" in out
