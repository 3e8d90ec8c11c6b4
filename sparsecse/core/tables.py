"""The one table renderer behind every table sparsecse prints or writes (CLI, report, model card)."""

from __future__ import annotations

LABELS = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R", "SST2": "SST", "avg": "Avg."}


def label(task: str) -> str:
    """A task's column name in the papers' tables (STS-B, SICK-R, SST, Avg.)."""
    return LABELS.get(task, task)


def cell(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    return v if isinstance(v, str) else f"{v:.{digits}f}"


def render(header: list[str], rows: list[list], markdown: bool = True, digits: int = 2, left: int = 1) -> str:
    """Markdown (the first `left` columns left-aligned, the rest right-aligned) or aligned plain text
    (as the papers' tables print in a terminal). Cells: str as is, numbers with `digits` decimals, None as —."""
    body = [[cell(v, digits) for v in r] for r in rows]
    if markdown:
        sep = "|" + "".join("---|" if i < left else "---:|" for i in range(len(header)))
        return "\n".join(["| " + " | ".join(header) + " |", sep, *("| " + " | ".join(r) + " |" for r in body)])
    w = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = [" | ".join(x.rjust(n) for x, n in zip(r, w)) for r in [header, *body]]
    return "\n".join([lines[0], "-+-".join("-" * n for n in w), *lines[1:]])


def task_table(results: dict[str, float], tasks, title: str = "") -> str:
    """One model's scores as the papers lay them out (STS12 … SICK-R Avg., or MR … MRPC Avg.), plain text."""
    cols = [*tasks, "avg"]
    return (f"{title}\n" if title else "") + render([label(t) for t in cols], [[results[t] for t in cols]],
                                                    markdown=False)
