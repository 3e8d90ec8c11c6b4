"""What the Hugging Face Hub reads: the base model's settings an export carries over (sentence-transformers'
max_seq_length and its Normalize step, the license), the model card's metadata (license, base_model,
pipeline_tag, tags, model-index of the STS results), and `export --push-to-hub` through huggingface_hub."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .. import SparseCSEError, __version__
from ..core.tables import label
from ..method.model import resolve_model_path

# the packaged backbone's Hub id: an export of `minilm` names it as its base model
KNOWN_BASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
CITATION = """@inproceedings{an2023sparsecse,
  title = {SparseCSE: Sparse Contrastive Learning of Sentence Embeddings},
  author = {An, Zhenyu and Zhang, Zhizhong and Song, Lei}, year = {2023}}
@inproceedings{gao2021simcse,
  title = {SimCSE: Simple Contrastive Learning of Sentence Embeddings},
  author = {Gao, Tianyu and Yao, Xingcheng and Chen, Danqi}, booktitle = {EMNLP}, year = {2021}}"""
# the STS tasks as the Hub's model-index names them (MTEB's datasets where there is one)
DATASETS = {"STSBenchmark": ("mteb/stsbenchmark-sts", "STS Benchmark (test)"),
            "SICKRelatedness": ("mteb/sickr-sts", "SICK-R (test)"),
            **{f"STS{y}": (f"mteb/sts{y}-sts", f"STS{y}") for y in (12, 13, 14, 15, 16)}}


def base_settings(pretrained: str | None) -> dict:
    """{"base_model": Hub id or None, "max_seq_length", "normalize", "license"} of the model the export started
    from, read from its directory where it is one (a sentence-transformers model keeps them there)."""
    out = {"base_model": None, "max_seq_length": None, "normalize": False, "license": None}
    if not pretrained:
        return out
    out["base_model"] = KNOWN_BASES.get(pretrained) or (pretrained if "/" in pretrained and
                                                         not Path(pretrained).exists() else None)
    try:
        d = Path(resolve_model_path(pretrained)).expanduser()
    except Exception:  # noqa: BLE001 - a hub name offline: nothing more to read
        return out
    if (d / "sentence_bert_config.json").is_file():
        out["max_seq_length"] = json.loads((d / "sentence_bert_config.json").read_text()).get("max_seq_length")
    if (d / "modules.json").is_file():
        out["normalize"] = any(m.get("type", "").endswith("Normalize")
                               for m in json.loads((d / "modules.json").read_text()))
    if (d / "README.md").is_file():
        front = _front_matter((d / "README.md").read_text())
        out["license"] = front.get("license")
        out["base_model"] = out["base_model"] or (front.get("base_model") if isinstance(front.get("base_model"), str)
                                                  else None)
    return out


def base_pooler(pretrained: str | None) -> str | None:
    """The pooling a sentence-transformers base model is published with, as sparsecse names it ("avg" for mean
    pooling, "cls_before_pooler" for CLS), or None when the model is not one (or not on this disk)."""
    if not pretrained:
        return None
    try:
        cfg = Path(resolve_model_path(pretrained)).expanduser() / "1_Pooling" / "config.json"
    except Exception:  # noqa: BLE001 - a hub name offline: unknown
        return None
    if not cfg.is_file():
        return None
    modes = json.loads(cfg.read_text())
    if modes.get("pooling_mode_mean_tokens"):
        return "avg"
    return "cls_before_pooler" if modes.get("pooling_mode_cls_token") else None


def _front_matter(text: str) -> dict:
    if not text.startswith("---\n"):
        return {}
    try:
        data = yaml.safe_load(text[4:text.index("\n---", 4)])
    except (ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def card_metadata(name: str, base: dict, results: dict | None, pruned: bool) -> dict:
    """The card's YAML front matter, as the Hub reads it; `results`: {STS task: Spearman × 100}."""
    meta = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
            "license": base.get("license") or "other",
            "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "sparsecse", "pruning",
                     *(["custom_code"] if pruned else [])]}
    if base.get("base_model"):
        meta["base_model"] = base["base_model"]
    rows = [{"task": {"type": "sentence-similarity", "name": "Semantic Textual Similarity"},
             "dataset": {"type": DATASETS[t][0], "name": DATASETS[t][1], "split": "test"},
             "metrics": [{"type": "spearman_cosine", "value": round(float(v) / 100, 4),
                          "name": f"Spearman (cosine) on {label(t)}"}]}
            for t, v in (results or {}).items() if t in DATASETS and isinstance(v, (int, float))]
    if rows:
        meta["model-index"] = [{"name": name, "results": rows}]
    return meta


def front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def versions() -> str:
    import torch
    import transformers

    return f"sparsecse {__version__}, transformers {transformers.__version__}, torch {torch.__version__}"


def check_push(repo: str) -> None:
    """A push that cannot happen is refused in one line before anything is exported: a repo name that is not
    OWNER/NAME, or no Hugging Face token."""
    from huggingface_hub import get_token

    if repo.count("/") != 1 or not all(part.strip() for part in repo.split("/")):
        raise SparseCSEError(f"--push-to-hub {repo!r}: name the repo as OWNER/NAME, e.g. my-org/minilm-sparsecse")
    if not get_token():
        raise SparseCSEError("--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN "
                             "(nothing was exported)")


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Upload `folder` (an export's pruned/ or dense directory) as the model repo `repo` (check_push first)."""
    from huggingface_hub import HfApi

    check_push(repo)
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message=f"Upload {folder.name} exported by sparsecse {__version__}")
    except Exception as e:  # noqa: BLE001 - the Hub's HTTP errors: one line, the export stays on disk
        raise SparseCSEError(f"--push-to-hub {repo}: the upload failed ({str(e).splitlines()[0][:200]}); the export "
                             "is on disk, push it again when the Hub answers") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"
