"""Physically pruned encoders: per-layer head and FFN-neuron counts (SparseCSE export) for BERT, RoBERTa,
XLM-RoBERTa, ELECTRA, MPNet, DistilBERT and ModernBERT.

This file is self-contained (torch + transformers, and packed.py beside it): the export copies it next to the
weights as `modeling_sparsecse.py`, with packed.py, so `AutoModel.from_pretrained(DIR, trust_remote_code=True)`
loads the model.

On a padded batch the model runs padding-free (packed.py: the per-token work on real tokens only), the same
outputs up to float rounding, with zeros at the padded positions of `last_hidden_state` — what sentence-transformers
and any pooling that masks padding read. Anything else (no padding, hidden states or attentions asked for, token
types, position ids, embeddings passed in, tracing or export, `model.padding_free = False`) runs the stock forward.
Layers keep the stock modules; their Linear layers are simply narrower (a fused [q; k; v] projection keeps its
three thirds, a gated FFN projection its value and gate halves). A layer with no heads left (or no neurons)
contributes only the output projection's bias, exactly as the fully masked layer does.
"""

import operator

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, ElectraConfig, ElectraModel,
                          ModernBertConfig, ModernBertModel, MPNetConfig, MPNetModel, RobertaConfig, RobertaModel,
                          XLMRobertaConfig, XLMRobertaModel)

from .packed import ADAPTERS, packed_forward, why_not

# family: (layers, attention module replaced when a layer has no heads, its kind, [q, k, v] or [fused qkv],
#          attention output, [FFN first projection], FFN second projection, gated, FFN module, intermediate size key)
# kind "self": the module returns (context (B, T, H·d), weights) and the output projection lives outside it;
#      "projected": the module returns (output (B, T, hidden), …) with the output projection inside it.
_BERT = ("encoder.layer", "attention.self", "self", ["attention.self.query", "attention.self.key",
         "attention.self.value"], "attention.output.dense", "intermediate.dense", "output.dense", False, None,
         "intermediate_size")
FAMILIES = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
    "mpnet": ("encoder.layer", "attention.attn", "projected", ["attention.attn.q", "attention.attn.k",
              "attention.attn.v"], "attention.attn.o", "intermediate.dense", "output.dense", False, None,
              "intermediate_size"),
    "distilbert": ("transformer.layer", "attention", "projected", ["attention.q_lin", "attention.k_lin",
                   "attention.v_lin"], "attention.out_lin", "ffn.lin1", "ffn.lin2", False, None, "hidden_dim"),
    "modernbert": ("layers", "attn", "projected", ["attn.Wqkv"], "attn.Wo", "mlp.Wi", "mlp.Wo", True, "mlp",
                   "intermediate_size"),
}


class _NoHeads(nn.Module):
    """Stands in for self-attention when a layer has no heads left: a (B, T, 0) context."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class _NoHeadsProjected(nn.Module):
    """Stands in for an attention module that projects its own output, when no heads are left: the projection's
    bias alone (a (0 → hidden) Linear on a (B, T, 0) context), kept under its own name (the weights' keys)."""

    def __init__(self, name, out):
        super().__init__()
        self.name = name
        setattr(self, name, out)

    def forward(self, hidden_states, *args, **kwargs):
        return getattr(self, self.name)(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


class _NoNeurons(nn.Module):
    """Stands in for a gated FFN with no neurons left: its second projection's bias alone (under its own name)."""

    def __init__(self, name, out):
        super().__init__()
        self.name = name
        setattr(self, name, out)

    def forward(self, hidden_states, *args, **kwargs):
        return getattr(self, self.name)(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))


class _SliceBias:
    """MPNet computes one relative-position bias for all heads, (B, H, T, T), and hands it to every layer: a layer
    with fewer heads takes its kept heads' slices (a pre-hook on its attention, which gets the bias third)."""

    def __init__(self, kept):
        self.kept = list(kept)

    def __call__(self, module, args):
        if len(args) > 2 and args[2] is not None:
            return args[:2] + (args[2][:, self.kept],) + args[3:]
        return None


def _set(root, path, module):
    parent, _, name = path.rpartition(".")
    setattr(operator.attrgetter(parent)(root) if parent else root, name, module)


def _linear(old, n_in, n_out):
    return nn.Linear(n_in, n_out, bias=old.bias is not None)


def _shrink(model, config, family):
    import warnings

    with warnings.catch_warnings():  # nn.Linear warns when a layer has 0 heads/neurons left
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        _shrink_layers(model, config, family)


def _shrink_layers(model, config, family):
    layers, attn, kind, qkv, o, ffn_in, ffn_out, gated, ffn, inter_key = FAMILIES[family]
    hidden = config.hidden_size
    d = hidden // config.num_attention_heads
    n_layers = config.num_hidden_layers
    heads = config.heads_per_layer or [config.num_attention_heads] * n_layers
    inter = config.intermediate_per_layer or [getattr(config, inter_key)] * n_layers
    kept = getattr(config, "kept_heads", None) or [None] * n_layers
    get = operator.attrgetter
    for layer, h, n, keep in zip(get(layers)(model), heads, inter, kept):
        out = _linear(get(o)(layer), h * d, hidden)
        if h == 0:
            _set(layer, o, out)
            _set(layer, attn, _NoHeads() if kind == "self" else _NoHeadsProjected(o[len(attn) + 1:], out))
        else:
            per = (3 if len(qkv) == 1 else 1) * h * d  # a fused projection holds q, k and v
            for path in qkv:
                _set(layer, path, _linear(get(path)(layer), hidden, per))
            _set(layer, o, out)
            module = get(attn)(layer)
            for name in ("num_attention_heads", "n_heads", "num_heads"):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, h)
            if isinstance(getattr(module, "all_head_size", None), int):
                module.all_head_size = h * d
            if family == "mpnet" and keep is not None and h < config.num_attention_heads:
                module.register_forward_pre_hook(_SliceBias(keep))
        second = _linear(get(ffn_out)(layer), n, hidden)
        if n == 0 and ffn is not None:
            _set(layer, ffn, _NoNeurons(ffn_out[len(ffn) + 1:], second))
            continue
        _set(layer, ffn_in, _linear(get(ffn_in)(layer), hidden, 2 * n if gated else n))
        _set(layer, ffn_out, second)


_STOCK_ONLY = ("position_ids", "inputs_embeds", "output_attentions", "output_hidden_states", "head_mask",
               "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "use_cache")


def _runs_padding_free(model, family, input_ids, attention_mask, args, kwargs) -> bool:
    """Whether this call can run padding-free and mean exactly the stock forward: a padded batch of ids with its
    2-D mask, nothing else asked for, not being traced or exported, and a model packed.py recognises."""
    if not getattr(model, "padding_free", False) or args or input_ids is None or attention_mask is None:
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return False  # first: a graph export must not branch on the values below
    if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape or bool(attention_mask.all()):
        return False
    if any(kwargs.get(k) not in (None, False) for k in _STOCK_ONLY) or set(kwargs) - {*_STOCK_ONLY, "token_type_ids",
                                                                                        "return_dict"}:
        return False
    types = kwargs.get("token_type_ids")
    if types is not None and bool(types.any()):
        return False
    if not hasattr(model, "_padding_free_why_not"):  # the modules' structure, checked once
        model._padding_free_why_not = why_not(model, ADAPTERS[family])
    return model._padding_free_why_not is None


def _pruned(base_config, base_model, family, pooling):
    """SparseCSE<Family>Config / Model: the stock classes with per-layer head and neuron counts."""

    class Config(base_config):
        model_type = "sparsecse_" + family.replace("-", "_")

        def __init__(self, heads_per_layer=None, intermediate_per_layer=None, kept_heads=None, **kwargs):
            super().__init__(**kwargs)
            self.heads_per_layer = heads_per_layer
            self.intermediate_per_layer = intermediate_per_layer
            self.kept_heads = kept_heads  # per layer, the original indices of the heads kept

    class Model(base_model):
        config_class = Config

        def __init__(self, config, **kwargs):
            if pooling:
                kwargs.setdefault("add_pooling_layer", False)
            super().__init__(config, **kwargs)
            _shrink(self, config, family)
            self.padding_free = True  # a padded batch runs on its real tokens only (packed.py)

        def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
            if _runs_padding_free(self, family, input_ids, attention_mask, args, kwargs):
                states = packed_forward(self, ADAPTERS[family], input_ids, attention_mask, cls_only=False)
                return (states,) if kwargs.get("return_dict") is False else BaseModelOutput(last_hidden_state=states)
            return super().forward(input_ids, attention_mask, *args, **kwargs)

    name = base_model.__name__[:-len("Model")]
    Config.__name__ = Config.__qualname__ = f"SparseCSE{name}Config"
    Model.__name__ = Model.__qualname__ = f"SparseCSE{name}Model"
    return Config, Model


SparseCSEBertConfig, SparseCSEBertModel = _pruned(BertConfig, BertModel, "bert", True)
SparseCSERobertaConfig, SparseCSERobertaModel = _pruned(RobertaConfig, RobertaModel, "roberta", True)
SparseCSEXLMRobertaConfig, SparseCSEXLMRobertaModel = _pruned(XLMRobertaConfig, XLMRobertaModel, "xlm-roberta", True)
SparseCSEElectraConfig, SparseCSEElectraModel = _pruned(ElectraConfig, ElectraModel, "electra", False)
SparseCSEMPNetConfig, SparseCSEMPNetModel = _pruned(MPNetConfig, MPNetModel, "mpnet", True)
SparseCSEDistilBertConfig, SparseCSEDistilBertModel = _pruned(DistilBertConfig, DistilBertModel, "distilbert", False)
SparseCSEModernBertConfig, SparseCSEModernBertModel = _pruned(ModernBertConfig, ModernBertModel, "modernbert", False)

CLASSES = {"bert": (SparseCSEBertConfig, SparseCSEBertModel),
           "roberta": (SparseCSERobertaConfig, SparseCSERobertaModel),
           "xlm-roberta": (SparseCSEXLMRobertaConfig, SparseCSEXLMRobertaModel),
           "electra": (SparseCSEElectraConfig, SparseCSEElectraModel),
           "mpnet": (SparseCSEMPNetConfig, SparseCSEMPNetModel),
           "distilbert": (SparseCSEDistilBertConfig, SparseCSEDistilBertModel),
           "modernbert": (SparseCSEModernBertConfig, SparseCSEModernBertModel)}


def _config(path):
    """The directory's config as its own class (a pruned one registered here, no remote code), or None for a
    stock model."""
    import json
    import os

    with open(os.path.join(path, "config.json")) as f:
        mtype = json.load(f)["model_type"]
    types = {c.model_type: (c, m) for c, m in CLASSES.values()}
    return types.get(mtype)


def load_tokenizer(path):
    """The export's (stock) tokenizer, given the config so transformers never looks for remote code."""
    from transformers import AutoTokenizer

    classes = _config(path)
    if classes is None:
        return AutoTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, config=classes[0].from_pretrained(path))


DROPOUTS = {"distilbert": ("dropout", "attention_dropout"),
            "modernbert": ("attention_dropout", "mlp_dropout", "embedding_dropout")}


def load(path, dropout=None):
    """Load a physically pruned export through sparsecse (no remote-code execution)."""
    from transformers.utils import logging as hf_logging

    cfg_cls, model_cls = _config(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # for this load only
    try:
        cfg = cfg_cls.from_pretrained(path)
        if dropout is not None:
            family = cfg_cls.model_type[len("sparsecse_"):].replace("_", "-")
            for key in DROPOUTS.get(family, ("hidden_dropout_prob", "attention_probs_dropout_prob")):
                setattr(cfg, key, dropout)
        return model_cls.from_pretrained(path, config=cfg), load_tokenizer(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
