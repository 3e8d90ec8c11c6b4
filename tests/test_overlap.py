"""Leak-aware reporting: per STS test task, its unique pairs that also occur in the selection data (STS-B dev) and
in the scoring pairs, against hand-made files and against the shared SentEval data."""

from __future__ import annotations

import shutil
import numpy as np

from sparsecse.method.data import Pairs, load_stsb, overlap_counts


def _stsb_line(s1: str, s2: str, gold: float) -> str:
    return f"main-news\tfile\t2012\t0001\t{gold}\t{s1}\t{s2}"


def test_overlap_counts_against_hand_made_files(tmp_path, tiny_data_dir):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    stsb = data / "senteval" / "STS" / "STSBenchmark" / "sts-test.csv"
    stsb.write_text("\n".join([_stsb_line("a cat sits", "a cat is sitting", 4.0),
                               _stsb_line("a cat sits", "a cat is sitting", 4.0),   # a duplicate: one unique pair
                               _stsb_line("dogs run", "a dog runs", 3.5),
                               _stsb_line("it rains", "the sun shines", 0.5)]) + "\n")
    sick = data / "senteval" / "SICK" / "SICK_test_annotated.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                    "1\ta man plays\ta man is playing\t4.5\tENTAILMENT\n"
                    "2\ta boy eats\ta girl sleeps\t1.2\tNEUTRAL\n")
    selection = Pairs(["a cat is sitting", "a boy eats"], ["a cat sits", "a girl sleeps"], np.array([4.0, 1.0]))
    scoring = Pairs(["dogs run", "a man plays"], ["a dog runs", "a woman plays"], np.array([3.5, 2.0]))
    got = overlap_counts(data, ["STSBenchmark", "SICKRelatedness"], selection, scoring)
    assert got == [{"task": "STSBenchmark", "pairs": 3, "in_selection": 1, "in_scoring": 1},  # reversed order counts
                   {"task": "SICKRelatedness", "pairs": 2, "in_selection": 1, "in_scoring": 0}]
    unlabeled = overlap_counts(data, ["SICKRelatedness"], selection, None)
    assert unlabeled == [{"task": "SICKRelatedness", "pairs": 2, "in_selection": 1, "in_scoring": None}]


def test_stsb_dev_overlaps_sts12_to_16_and_only_sick_r_is_clean(data_dir):
    """On the shared SentEval data: selecting on STS-B dev touches 1,131 unique STS12–16 test pairs (the figure
    issue 25 counted from the dev side: 1,130 of 1,498), so only SICK-R is clean of both selection and scoring."""
    from sparsecse.study.select import clean_tasks

    data = data_dir
    tasks = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
    got = overlap_counts(data, tasks, load_stsb(data, "dev"), load_stsb(data, "train"))
    assert sum(o["in_selection"] for o in got[:5]) == 1131
    assert [o["in_selection"] for o in got] == [255, 81, 193, 580, 22, 3, 0]
    assert clean_tasks(got) == ["SICKRelatedness"]


def test_the_report_shows_the_overlap_and_the_clean_average():
    from sparsecse.core.config import load_config
    from sparsecse.study.report import ReportInputs, _overlap_lines
    from sparsecse.study.select import Findings, clean_average, clean_tasks

    cfg = load_config(None, [])
    overlap = [{"task": "STS12", "pairs": 10, "in_selection": 2, "in_scoring": 3},
               {"task": "STSBenchmark", "pairs": 8, "in_selection": 0, "in_scoring": 0},
               {"task": "SICKRelatedness", "pairs": 6, "in_selection": 0, "in_scoring": None}]
    sel = {"STS12": 70.0, "STSBenchmark": 80.0, "SICKRelatedness": 70.0}
    ctrl = {"STS12": 71.0, "STSBenchmark": 79.0, "SICKRelatedness": 69.0}
    clean = clean_tasks(overlap)
    assert clean == ["STSBenchmark", "SICKRelatedness"]
    found = Findings(clean_tasks=clean, clean_selected=clean_average(sel, clean), clean_control=clean_average(ctrl, clean))
    inp = ReportInputs("t", cfg, [], [], None, {"test": ctrl}, {}, scoring={"overlap": overlap}, findings=found)
    text = "\n".join(_overlap_lines(inp))
    assert "| STS12 | 10 | 2 | 3 |" in text and "| SICK-R | 6 | 0 | — (label-free) |" in text.replace(
        "SICKRelatedness", "SICK-R")
    assert "Their average for the selected point: 75.00 (the s = 0 control: 74.00)." in text


def test_select_on_sick_r_dev_leaves_every_sts_test_set_clean(data_dir):
    """sweep.select_on: sickr-dev — SICK's trial split shares no pair with STS12–16 or STS-B test (9 with SICK-R
    test); with label-free scoring, six of the seven STS tasks are clean of every choice the sweep makes."""
    from sparsecse.method.data import selection_pairs
    from sparsecse.study.select import clean_tasks

    tasks = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
    got = overlap_counts(data_dir, tasks, selection_pairs(data_dir, "sickr-dev"), None)
    assert [o["in_selection"] for o in got] == [0, 0, 0, 0, 0, 0, 9]
    assert clean_tasks(got) == tasks[:6]


def test_select_on_reads_named_sets_and_a_users_file(tmp_path, tiny_data_dir):
    import pytest

    from sparsecse import SparseCSEError
    from sparsecse.core.config import load_config
    from sparsecse.method.data import needed_paths, selection_pairs
    from sparsecse.method.train import dev_pairs

    assert len(selection_pairs(tiny_data_dir, "stsb-dev").s1) == len(load_stsb(tiny_data_dir, "dev").s1)
    mine = tmp_path / "mine.tsv"
    mine.write_text("".join(f"sentence {i} a\tsentence {i} b\t{i % 5}.0\n" for i in range(12)))
    pairs = selection_pairs(tiny_data_dir, str(mine))
    assert pairs.s1[3] == "sentence 3 a" and pairs.gold[4] == 4.0 and len(pairs.s1) == 12
    assert len(dev_pairs(tiny_data_dir, 10, select_on=str(mine)).s1) == 10  # eval_max_pairs subsamples it
    mine.write_text("only\ttwo\n" + mine.read_text())
    with pytest.raises(SparseCSEError, match=r"mine.tsv:1: expected sentence1<TAB>sentence2<TAB>score"):
        selection_pairs(tiny_data_dir, str(mine))
    (tmp_path / "few.tsv").write_text("a\tb\t1\n")
    with pytest.raises(SparseCSEError, match="a dev set needs at least 10"):
        selection_pairs(tiny_data_dir, str(tmp_path / "few.tsv"))
    with pytest.raises(SparseCSEError, match="sweep.select_on"):
        load_config(None, ["sweep.select_on=sts-b"])
    assert "senteval/SICK/SICK_trial.txt" in needed_paths("wiki/x.txt", "train", [], select_on="sickr-dev")
    assert "senteval/STS/STSBenchmark/sts-dev.csv" not in needed_paths("wiki/x.txt", "train", [],
                                                                        select_on="sickr-dev")


def test_stage_one_depends_on_the_selection_data_and_reports_name_it():
    from sparsecse.core.config import load_config
    from sparsecse.study.report import ReportInputs, _selection_lines
    from sparsecse.study.select import Selection
    from sparsecse.run.rundir import stage1_fingerprint as _stage1_fp

    base, sick = load_config(None, ["sweep.select_on=stsb-dev"]), load_config(None, ["sweep.select_on=sickr-dev"])
    assert _stage1_fp(base.to_dict()) != _stage1_fp(sick.to_dict())  # a different checkpoint pick: a new stage 1
    old = {k: v for k, v in base.to_dict().items()}
    old["sweep"] = {k: v for k, v in old["sweep"].items() if k != "select_on"}  # a sweep.json from before the key
    assert _stage1_fp(old) == _stage1_fp(base.to_dict())
    inp = ReportInputs("t", sick, [], [], None, None, {})
    assert inp.dev == "SICK-R dev"
    sel = Selection(sparsity=0.1, lam=0.5, combine="gradient", normalize="none", method="align_uniform",
                    control_won=False, candidates=2, objective="dev", params=None, dev_mean=80.0, seeds=[1],
                    test={"STSBenchmark": 78.0}, test_std={"STSBenchmark": None}, trial="t", checkpoint=None,
                    replicate=0, rule="best_dev")
    text = "\n".join(_selection_lines(sel, sick))
    assert "SICK-R dev 80.00" in text and "(SICK-R dev − STS-B test): +2.00" in text and "STS-B dev" not in text


def test_the_report_puts_the_overlap_after_the_results_and_the_answer_counts_the_choice_pairs():
    """Readers meet the results first: the overlap section follows the test table (it qualifies it), and the
    answer says on how many held-out pairs the choice was made."""
    import report_scenarios as S

    from sparsecse.core.config import load_config
    from sparsecse.core.results import TrialResult
    from sparsecse.study.report import ReportInputs, answer, render_markdown
    from sparsecse.study.select import control, findings, results_table, select

    res = [TrialResult.from_record(r) for r in S.grid()]
    cfg = load_config(None, S.GRID_OVR)
    tasks = ["STS12", "STSBenchmark", "SICKRelatedness", "avg"]
    overlap = [{"task": "STS12", "pairs": 10, "in_selection": 2, "in_scoring": 3},
               {"task": "STSBenchmark", "pairs": 8, "in_selection": 0, "in_scoring": 0},
               {"task": "SICKRelatedness", "pairs": 6, "in_selection": 0, "in_scoring": None}]
    selection = [{"source": "stsb-dev", "pairs": 1500, "left_out": 1133, "checkpoint": 178, "choice": 189},
                 {"source": "sickr-dev", "pairs": 500, "left_out": 9, "checkpoint": 249, "choice": 242}]
    sel = select(res, cfg.sweep.select_lam)
    inp = ReportInputs("t", cfg, res, results_table(res, tasks), sel, control(res), S.BASELINE,
                       scoring={**S.SCORING, "overlap": overlap, "selection": selection},
                       findings=findings(res, sel, tasks, cfg.sweep.select_lam, overlap=overlap))
    md = render_markdown(inp)
    assert md.index("## Test results") < md.index("## Overlap of the test sets") < md.index("## All trials")
    assert "(431 pairs no checkpoint was picked on, no test set holds)" in answer(inp)
