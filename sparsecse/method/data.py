"""Data: the unlabeled training corpus (wiki1m format) and the SentEval-layout STS sets.

STS loaders follow SentEval (and SimCSE's fork of it) line by line: files read with `splitlines()`,
sentences whitespace-split and re-joined, pairs with an empty gold line dropped. Bad files raise
SparseCSEError naming the file and line.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import SparseCSEError

# SentEval's subsets per year (SMT for STS13 is licensed and absent, as in SentEval).
STS_SUBSETS = {
    "STS12": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13": ["FNWN", "headlines", "OnWN"],
    "STS14": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}


def default_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--data-dir, then $SPARSECSE_DATA_DIR, then ~/.cache/sparsecse/data (not checked: see resolve_data_dir)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("SPARSECSE_DATA_DIR"):
        return Path(os.environ["SPARSECSE_DATA_DIR"]).expanduser()
    return Path.home() / ".cache" / "sparsecse" / "data"


def train_path(train_file: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """data.train_file on this node: an absolute path as is, a relative one under the data dir."""
    path = Path(train_file)
    return path if path.is_absolute() else Path(data_dir) / path


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data dir (default_data_dir), which must exist on this machine."""
    d = default_data_dir(explicit)
    if not d.is_dir():
        raise SparseCSEError(f"data dir {d} does not exist; pass --data-dir, set SPARSECSE_DATA_DIR, "
                             "or run `sparsecse data fetch`")
    return d.resolve()


_TASK_PATHS = {**{y: f"senteval/STS/{y}-en-test" for y in STS_SUBSETS},
               "STSBenchmark": "senteval/STS/STSBenchmark/sts-test.csv",
               "SICKRelatedness": "senteval/SICK/SICK_test_annotated.txt",
               "MR": "senteval/MR", "CR": "senteval/CR", "SUBJ": "senteval/SUBJ", "MPQA": "senteval/MPQA",
               "SST2": "senteval/SST/binary", "TREC": "senteval/TREC", "MRPC": "senteval/MRPC"}


def needed_paths(train_file: str, score_split: str, tasks, transfer_tasks=(),
                 select_on: str = "stsb-dev") -> list[str]:
    """The files and folders (relative to the data dir, or absolute) a sweep reads: checked on every node first."""
    paths = [train_file, *selection_paths(select_on), f"senteval/STS/STSBenchmark/sts-{score_split}.csv"]
    paths += [_TASK_PATHS[t] for t in (*tasks, *transfer_tasks) if t in _TASK_PATHS]
    return list(dict.fromkeys(paths))


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """A data file's lines; a missing or undecodable file is a one-line error naming it."""
    if not path.is_file():
        raise SparseCSEError(f"{path}: file not found; check --data-dir or run `sparsecse data fetch`")
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as e:
        raise SparseCSEError(f"{path}: not UTF-8 text (byte {e.start}); is this a binary file?") from None


def _float(value: str, path: Path, lineno: int, what: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise SparseCSEError(f"{path}:{lineno}: {what} {value!r} is not a number; fix or remove the line") from None
    if not np.isfinite(x):
        raise SparseCSEError(f"{path}:{lineno}: {what} {value!r} is not finite")
    return x


def norm_space(sentence: str) -> str:
    """SentEval splits on whitespace; SimCSE's batcher joins the tokens with single spaces."""
    return " ".join(sentence.split())


def positives(gold: np.ndarray, threshold: float = 4.0, rule: str = "gt") -> np.ndarray:
    """Which pairs are positives for alignment: gold > threshold ("gt", SimCSE §5: "pairs with a score higher
    than 4") or gold >= threshold ("ge")."""
    gold = np.asarray(gold)
    return gold > threshold if rule == "gt" else gold >= threshold


@dataclass(frozen=True)
class Pairs:
    """Scored sentence pairs: s1[i], s2[i], gold[i]; `source[i]` names the set a pair came from where a set mixes
    several (the clean selection data: "stsb-dev", "sickr-dev")."""

    s1: list[str]
    s2: list[str]
    gold: np.ndarray  # (N,) float
    source: tuple | None = None

    def __len__(self) -> int:
        return len(self.s1)

    def subset(self, idx) -> "Pairs":
        idx = list(idx)
        return Pairs([self.s1[i] for i in idx], [self.s2[i] for i in idx], self.gold[idx],
                     None if self.source is None else tuple(self.source[i] for i in idx))


def load_sts_year(data_dir: Path, year: str) -> dict[str, Pairs]:
    """STS12–16: {subset: Pairs}, unscored pairs (empty gold line) dropped as SentEval does."""
    base = Path(data_dir) / "senteval" / "STS" / f"{year}-en-test"
    out = {}
    for subset in STS_SUBSETS[year]:
        ipath, gpath = base / f"STS.input.{subset}.txt", base / f"STS.gs.{subset}.txt"
        inputs, golds = read_lines(ipath), read_lines(gpath)
        if len(inputs) != len(golds):
            raise SparseCSEError(f"{gpath}: {len(golds)} lines but {ipath.name} has {len(inputs)}; "
                                 "the gold file must have one line per pair")
        s1, s2, gold = [], [], []
        for i, (line, g) in enumerate(zip(inputs, golds), start=1):
            parts = line.split("\t")
            if len(parts) != 2:
                raise SparseCSEError(f"{ipath}:{i}: expected 2 tab-separated sentences, found {len(parts)} columns")
            if g == "":
                continue
            gold.append(_float(g, gpath, i, "gold score"))
            s1.append(norm_space(parts[0]))
            s2.append(norm_space(parts[1]))
        out[subset] = Pairs(s1, s2, np.asarray(gold, dtype=np.float64))
    return out


def load_stsb(data_dir: Path, split: str) -> Pairs:
    path = Path(data_dir) / "senteval" / "STS" / "STSBenchmark" / f"sts-{split}.csv"
    s1, s2, gold = [], [], []
    for i, line in enumerate(read_lines(path), start=1):
        cols = line.strip().split("\t")
        if len(cols) < 7:
            raise SparseCSEError(f"{path}:{i}: expected >= 7 tab-separated columns (score in 5, sentences in 6-7), "
                                 f"found {len(cols)}")
        gold.append(_float(cols[4], path, i, "score"))
        s1.append(norm_space(cols[5]))
        s2.append(norm_space(cols[6]))
    return Pairs(s1, s2, np.asarray(gold, dtype=np.float64))


def load_sick(data_dir: Path, split: str) -> Pairs:
    name = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}[split]
    path = Path(data_dir) / "senteval" / "SICK" / name
    s1, s2, gold = [], [], []
    for i, line in enumerate(read_lines(path), start=1):
        if i == 1:  # header row
            continue
        cols = line.strip().split("\t")
        if len(cols) < 4:
            raise SparseCSEError(f"{path}:{i}: expected >= 4 tab-separated columns (relatedness in 4), found {len(cols)}")
        gold.append(_float(cols[3], path, i, "relatedness score"))
        s1.append(norm_space(cols[1]))
        s2.append(norm_space(cols[2]))
    return Pairs(s1, s2, np.asarray(gold, dtype=np.float64))


CLEAN_SOURCES = ("stsb-dev", "sickr-dev")  # the sets the clean selection data is drawn from (sweep.select_on names)
ALL_TEST_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")


def _key(a: str, b: str) -> tuple[str, str]:
    """A pair's identity, whichever order its sentences come in."""
    return (a, b) if a <= b else (b, a)


@functools.lru_cache(maxsize=4)
def _clean(data_dir: str) -> Pairs:
    pools = {"stsb-dev": load_stsb(Path(data_dir), "dev"), "sickr-dev": load_sick(Path(data_dir), "dev")}
    test = {_key(a, b) for t in ALL_TEST_TASKS for p in load_sts_task(Path(data_dir), t).values()
            for a, b in zip(p.s1, p.s2)}
    s1, s2, gold, source, seen = [], [], [], [], set()
    for name in CLEAN_SOURCES:
        p = pools[name]
        for a, b, g in zip(p.s1, p.s2, p.gold):
            k = _key(a, b)
            if k in test or k in seen:
                continue
            seen.add(k)
            s1.append(a), s2.append(b), gold.append(g), source.append(name)
    return Pairs(s1, s2, np.asarray(gold, dtype=np.float64), tuple(source))


def clean_selection(data_dir: Path) -> Pairs:
    """sweep.select_on: clean-dev — STS-B dev and SICK-R dev (SICK's trial split) with every pair that also occurs
    (verbatim, either order) in a test set the report scores (STS12–16, STS-B test, SICK-R test) removed, and
    duplicates dropped; each pair keeps its source. Nothing a test set holds can choose anything."""
    return _clean(str(Path(data_dir).resolve()))


def _half(pairs: Pairs, which: int) -> Pairs:
    """The pairs whose sha256 (of the unordered pair) is even (`which` 0) or odd (1): a split fixed by the data
    alone, about half of each source on either side."""
    idx = [i for i, (a, b) in enumerate(zip(pairs.s1, pairs.s2))
           if hashlib.sha256("\t".join(_key(a, b)).encode()).digest()[0] % 2 == which]
    return pairs.subset(idx)


def clean_counts(data_dir: Path) -> list[dict]:
    """Per source of the clean selection data: its pairs, those left out (a reported test set holds them, or they
    repeat), and how many the checkpoint and the choice halves keep — what the report prints."""
    clean = clean_selection(data_dir)
    halves = [_half(clean, i) for i in (0, 1)]
    pools = {"stsb-dev": load_stsb(Path(data_dir), "dev"), "sickr-dev": load_sick(Path(data_dir), "dev")}
    out = []
    for name in CLEAN_SOURCES:
        kept = [sum(1 for x in h.source if x == name) for h in halves]
        out.append({"source": name, "pairs": len(pools[name]), "left_out": len(pools[name]) - sum(kept),
                    "checkpoint": kept[0], "choice": kept[1]})
    return out


def selection_all(data_dir: Path, select_on: str) -> Pairs:
    """Every pair sweep.select_on reads, whichever part reads it (the overlap table counts against these)."""
    return clean_selection(data_dir) if select_on == "clean-dev" else selection_pairs(data_dir, select_on)


PARTS = ("checkpoint", "choice")  # which clean half a reader gets: the trials' checkpoints, the sweep's choice


def selection_pairs(data_dir: Path, select_on: str = "stsb-dev", part: str = "checkpoint") -> Pairs:
    """The pairs dev evaluations read (sweep.select_on): the clean selection data (`clean-dev`), STS-B dev,
    SICK-R dev (SICK_trial), or a user file of sentence1<TAB>sentence2<TAB>score lines (relative to the data dir,
    or absolute). With clean-dev, `part` "checkpoint" (what picks each training run's best checkpoint) and "choice"
    (what the sweep chooses its point on) are disjoint halves, so no pair is read twice; the other sets are one set
    for both (the paper's protocol: the same pairs pick checkpoints and the point)."""
    if select_on == "clean-dev":
        return _half(clean_selection(data_dir), PARTS.index(part))
    if select_on == "stsb-dev":
        return load_stsb(data_dir, "dev")
    if select_on == "sickr-dev":
        return load_sick(data_dir, "dev")
    path = Path(select_on) if Path(select_on).is_absolute() else Path(data_dir) / select_on
    s1, s2, gold = [], [], []
    for i, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        cols = line.rstrip("\n").split("\t")
        if len(cols) != 3:
            raise SparseCSEError(f"{path}:{i}: expected sentence1<TAB>sentence2<TAB>score, found {len(cols)} columns")
        gold.append(_float(cols[2], path, i, "score"))
        s1.append(norm_space(cols[0]))
        s2.append(norm_space(cols[1]))
    if len(gold) < 10:
        raise SparseCSEError(f"{path}: {len(gold)} scored pairs; a dev set needs at least 10 (sweep.select_on)")
    return Pairs(s1, s2, np.asarray(gold, dtype=np.float64))


def selection_paths(select_on: str) -> list[str]:
    """The files sweep.select_on reads, relative to the data dir (or absolute): what every node must see (the
    clean selection data also reads every test set, to leave their pairs out)."""
    named = {"stsb-dev": ["senteval/STS/STSBenchmark/sts-dev.csv"], "sickr-dev": ["senteval/SICK/SICK_trial.txt"]}
    if select_on == "clean-dev":
        return [*named["stsb-dev"], *named["sickr-dev"], *(_TASK_PATHS[t] for t in ALL_TEST_TASKS)]
    return named.get(select_on, [select_on])


def unlabeled_pairs(path: Path, n: int, seed: int = 0) -> Pairs:
    """Label-free positives: `n` sentences of an unlabeled corpus, each paired with itself (the two dropout views
    of a forward in train mode make the pair, as SimCSE trains); gold = +inf, so every pair is positive."""
    lines = [norm_space(x) for x in read_lines(Path(path))]
    lines = [x for x in dict.fromkeys(lines) if x]
    if len(lines) < 2:
        raise SparseCSEError(f"{path}: needs at least 2 non-empty sentences for label-free scoring")
    idx = np.sort(np.random.default_rng(seed).permutation(len(lines))[:n])
    sents = [lines[i] for i in idx]
    return Pairs(sents, list(sents), np.full(len(sents), np.inf))


def sts_test_overlap(pairs: Pairs, data_dir: Path, years=("STS12", "STS13", "STS14", "STS15", "STS16")) -> int:
    """How many unique pairs of `pairs` appear verbatim (either order) among the STS12–16 test pairs — the
    leak when importance is scored on STS-B train (built from STS 2012–2017) and reported on STS12–16."""
    test = set()
    for year in years:
        for p in load_sts_task(data_dir, year).values():
            test.update(zip(p.s1, p.s2))
            test.update(zip(p.s2, p.s1))
    return len({(a, b) for a, b in zip(pairs.s1, pairs.s2)} & test)


def _pair_set(pairs: Pairs) -> set:
    return {(a, b) for a, b in zip(pairs.s1, pairs.s2)} | {(b, a) for a, b in zip(pairs.s1, pairs.s2)}


def overlap_counts(data_dir: Path, tasks, selection: Pairs, scoring: Pairs | None) -> list[dict]:
    """Per STS test task: its unique pairs, and how many of them also occur (verbatim, either order) in the data
    that selects (checkpoints and the sweep's choice: STS-B dev) and in the data importance was scored on (None:
    label-free scoring reads no pairs). A task with both counts at 0 is clean of the sweep's choices."""
    sel, score = _pair_set(selection), (_pair_set(scoring) if scoring is not None else set())
    out = []
    for task in tasks:
        mine = set()
        for p in load_sts_task(data_dir, task).values():
            mine.update(zip(p.s1, p.s2))
        unordered = {tuple(sorted(x)) for x in mine}
        out.append({"task": task, "pairs": len(unordered),
                    "in_selection": sum(1 for x in unordered if x in sel),
                    "in_scoring": None if scoring is None else sum(1 for x in unordered if x in score)})
    return out


def load_sts_task(data_dir: Path, task: str) -> dict[str, Pairs]:
    """The pairs a task is scored on: all subsets for STS12–16, the test split for STS-B and SICK-R."""
    if task in STS_SUBSETS:
        return load_sts_year(data_dir, task)
    if task == "STSBenchmark":
        return {"test": load_stsb(data_dir, "test")}
    if task == "SICKRelatedness":
        return {"test": load_sick(data_dir, "test")}
    if task == "STSBenchmark-dev":
        return {"dev": load_stsb(data_dir, "dev")}
    raise SparseCSEError(f"unknown STS task {task!r}")


# --------------------------------------------------------------------------- training corpus

def check_text_file(path: Path) -> None:
    """Refuse a missing, empty or binary corpus before tokenising it."""
    if not path.is_file():
        raise SparseCSEError(f"{path}: training corpus not found; set data.train_file or --data-dir")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise SparseCSEError(f"{path}: training corpus is empty; it needs one sentence a line")
    if b"\x00" in head:
        raise SparseCSEError(f"{path}: looks binary (NUL bytes); the corpus must be UTF-8 text, one sentence a line")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte char cut at the chunk end is fine
            raise SparseCSEError(f"{path}: not UTF-8 text (byte {e.start}); the corpus must be UTF-8") from None


def _non_empty(batch: dict) -> list[bool]:
    return [bool(t.strip()) for t in batch["text"]]


def _tokenize(batch: dict, tokenizer, max_len: int) -> dict:
    return tokenizer(batch["text"], truncation=True, max_length=max_len)


def load_corpus(path: str | os.PathLike, tokenizer, max_len: int, max_sentences: int | None = None):
    """Tokenised unlabeled corpus as a `datasets.Dataset` with input_ids (no padding; Arrow-cached)."""
    import datasets

    path = Path(path)
    check_text_file(path)
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=str(path), split="train")
    # explicit fingerprints: datasets would otherwise hash the functions (slow and noisy under Ray)
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{getattr(tokenizer, 'name_or_path', '')}:{max_len}"
    fp = hashlib.sha256(key.encode()).hexdigest()[:16]
    ds = ds.filter(_non_empty, batched=True, new_fingerprint=f"nonempty-{fp}")
    if max_sentences is not None:
        ds = ds.select(range(min(max_sentences, len(ds))))
    if len(ds) == 0:
        raise SparseCSEError(f"{path}: training corpus has no non-empty lines")
    ds = ds.map(functools.partial(_tokenize, tokenizer=tokenizer, max_len=max_len), batched=True,
                remove_columns=["text"], new_fingerprint=f"tok-{fp}-{max_sentences}")
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    return ds.select_columns(keep)


def collate(features: list[dict], pad_token_id: int) -> dict:
    """Dynamic padding to the longest sequence in the batch."""
    import torch

    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_token_id, dtype=torch.long)
    att = torch.zeros((len(features), n), dtype=torch.long)
    for i, f in enumerate(features):
        L = len(f["input_ids"])
        ids[i, :L] = torch.as_tensor(f["input_ids"])
        att[i, :L] = 1
    return {"input_ids": ids, "attention_mask": att}
