"""Transfer tasks: the classifier protocol on synthetic data, loaders on slices of the real files, bad files."""

import numpy as np
import pytest

from sparsecse import SparseCSEError
from sparsecse.method.classifier import L2_GRID
from sparsecse.method.transfer import SKLEARN, C_GRID, choose_c, cv_accuracy, dev_test_accuracy, load_task, train_test_scores
from transfer_oracle import PYTORCH_SEQUENTIAL, TorchLogReg

LEARNERS = {"pytorch": PYTORCH_SEQUENTIAL, "sklearn": SKLEARN}


def _blobs(n, sep, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, 5))
    X[:, 0] += sep * (2 * y - 1)
    return X, y


@pytest.mark.parametrize("clf", ["pytorch", "sklearn"])
def test_cv_accuracy_on_separable_and_random_data(clf):
    X, y = _blobs(200, 6.0, 0)
    # Adam keeps the first round that is best on validation (SentEval's rule): on ~130 training points that round
    # has had a few steps, so the pytorch classifier is near, not at, the separable optimum (3 × 2 folds: the
    # protocol's 10 × 10 is the same code with more fits)
    assert cv_accuracy(X, y, k=3, inner_k=2, learner=LEARNERS[clf]) >= (100.0 if clf == "sklearn" else 90.0)
    rng = np.random.default_rng(1)
    Xr, yr = rng.normal(size=(200, 5)), rng.integers(0, 2, 200)
    acc = cv_accuracy(Xr, yr, k=3, inner_k=2, learner=LEARNERS[clf])
    assert 30.0 < acc < 70.0  # chance level on labels unrelated to the features


@pytest.mark.parametrize("clf,grid", [("pytorch", L2_GRID), ("sklearn", C_GRID)])
def test_results_repeat_exactly_and_the_regulariser_comes_from_the_grid(clf, grid):
    X, y = _blobs(120, 0.7, 2)
    assert cv_accuracy(X, y, k=3, inner_k=2, learner=LEARNERS[clf]) == cv_accuracy(X, y, k=3, inner_k=2, learner=LEARNERS[clf])
    assert choose_c(X, y, k=2, learner=LEARNERS[clf]) in grid
    assert L2_GRID == (1e-5, 1e-4, 1e-3, 1e-2)  # SentEval's usepytorch grid, as SimCSE runs it


@pytest.mark.parametrize("clf", ["pytorch", "sklearn"])
def test_dev_selected_and_train_test_protocols(clf):
    X, y = _blobs(300, 3.0, 3)
    acc = dev_test_accuracy(X[:200], y[:200], X[200:250], y[200:250], X[250:], y[250:], learner=LEARNERS[clf])
    assert acc >= 90.0
    acc, f1 = train_test_scores(X[:200], y[:200], X[200:], y[200:], k=3, learner=LEARNERS[clf])
    assert acc >= 90.0 and 0 < f1 <= 100


def test_pytorch_classifier_early_stops_on_validation_and_keeps_the_best_round():
    """Labels unrelated to the features: validation accuracy stops improving, so training stops after `tenacity`
    stale rounds, far before max_epoch; on separable data it fits and predicts the original label values."""
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(300, 8)), rng.integers(0, 2, 300)
    clf = TorchLogReg(1e-3, tenacity=2, epoch_size=1, max_epoch=200)
    calls = []
    orig = clf.predict
    clf.predict = lambda Z: calls.append(1) or orig(Z)
    clf.fit(X[:250], y[:250], val=(X[250:], y[250:]))
    assert 3 <= len(calls) < 60  # rounds evaluated on validation: stopped early
    Xs, ys = _blobs(200, 6.0, 5)
    labels = np.where(ys == 1, 7, 3)  # arbitrary label values come back as such
    pred = TorchLogReg(1e-4).fit(Xs, labels).predict(Xs)
    assert set(pred.tolist()) == {3, 7} and (pred == labels).mean() > 0.8


def test_real_loaders_have_senteval_sizes(data_dir):
    sizes = {t: {s: len(v[1]) for s, v in load_task(data_dir, t).data.items()}
             for t in ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC")}
    assert sizes == {"MR": {"all": 10662}, "CR": {"all": 3775}, "SUBJ": {"all": 10000}, "MPQA": {"all": 10606},
                     "SST2": {"train": 67349, "dev": 872, "test": 1821}, "TREC": {"train": 5452, "test": 500},
                     "MRPC": {"train": 4076, "test": 1725}}
    trec = load_task(data_dir, "TREC")
    assert set(trec.data["train"][1].tolist()) == set(range(6))


def test_malformed_transfer_files_name_file_and_line(tmp_path):
    sst = tmp_path / "senteval" / "SST" / "binary"
    sst.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (sst / f"sentiment-{split}").write_text("good movie\t1\nbad movie\t7\n")
    with pytest.raises(SparseCSEError, match=r"sentiment-train:2"):
        load_task(tmp_path, "SST2")
    trec = tmp_path / "senteval" / "TREC"
    trec.mkdir(parents=True)
    (trec / "train_5500.label").write_text("DESC:manner How does it work ?\nXYZ:foo what ?\n")
    with pytest.raises(SparseCSEError, match=r"train_5500.label:2"):
        load_task(tmp_path, "TREC")
    mrpc = tmp_path / "senteval" / "MRPC"
    mrpc.mkdir(parents=True)
    (mrpc / "msr_paraphrase_train.txt").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tonly one\n")
    with pytest.raises(SparseCSEError, match=r"msr_paraphrase_train.txt:2"):
        load_task(tmp_path, "MRPC")


def test_pair_features():
    from sparsecse.method.transfer import pair_features

    u, v = np.array([[1.0, -2.0]]), np.array([[3.0, 1.0]])
    assert pair_features(u, v).tolist() == [[1, -2, 3, 1, 2, 3, 3, -2]]
    assert pair_features(u, v, "senteval").tolist() == [[2, 3, 3, -2]]


def test_transfer_evaluation_end_to_end_on_tiny_model(tiny, data_dir):
    from sparsecse.core.tables import task_table
    from sparsecse.method.transfer import evaluate_transfer, format_transfer_markdown

    r = evaluate_transfer(tiny, data_dir, tasks=("MRPC", "SST2", "CR"), max_examples=120, folds=(3, 3))
    assert set(r) == {"MRPC", "MRPC_f1", "SST2", "CR", "avg"}
    assert all(0 <= r[t] <= 100 for t in ("MRPC", "SST2", "CR"))
    assert r == evaluate_transfer(tiny, data_dir, tasks=("MRPC", "SST2", "CR"), max_examples=120, folds=(3, 3))
    assert task_table(r, ("MRPC", "SST2", "CR")).splitlines()[0].split() == ["MRPC", "|", "SST", "|", "CR", "|", "Avg."]
    assert "| base |" in format_transfer_markdown({"base": r})
