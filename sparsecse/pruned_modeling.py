"""Physically pruned BERT/RoBERTa: per-layer head and FFN-neuron counts (SparseCSE export).

This file is self-contained (torch + transformers only): the export copies it next to the weights as
`modeling_sparsecse.py` so `AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads the model.
Layers keep the stock modules; their Linear layers are simply narrower. A layer with no heads left
(or no neurons) contributes only the output projection's bias, exactly as the fully masked layer does.
"""

from torch import nn
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel


class _NoHeads(nn.Module):
    """Stands in for self-attention when a layer has no heads left: a (B, T, 0) context."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _shrink(model, config):
    import warnings

    with warnings.catch_warnings():  # nn.Linear warns when a layer has 0 heads/neurons left
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        _shrink_layers(model, config)


def _shrink_layers(model, config):
    hidden = config.hidden_size
    d = hidden // config.num_attention_heads
    heads = config.heads_per_layer or [config.num_attention_heads] * config.num_hidden_layers
    inter = config.intermediate_per_layer or [config.intermediate_size] * config.num_hidden_layers
    for layer, h, n in zip(model.encoder.layer, heads, inter):
        att = layer.attention
        if h == 0:
            att.self = _NoHeads()
        else:
            for name in ("query", "key", "value"):
                setattr(att.self, name, nn.Linear(hidden, h * d))
            att.self.num_attention_heads = h
            att.self.all_head_size = h * d
        att.output.dense = nn.Linear(h * d, hidden)
        layer.intermediate.dense = nn.Linear(hidden, n)
        layer.output.dense = nn.Linear(n, hidden)


class SparseCSEBertConfig(BertConfig):
    model_type = "sparsecse_bert"

    def __init__(self, heads_per_layer=None, intermediate_per_layer=None, **kwargs):
        super().__init__(**kwargs)
        self.heads_per_layer = heads_per_layer
        self.intermediate_per_layer = intermediate_per_layer


class SparseCSEBertModel(BertModel):
    config_class = SparseCSEBertConfig

    def __init__(self, config, add_pooling_layer=False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _shrink(self, config)


class SparseCSERobertaConfig(RobertaConfig):
    model_type = "sparsecse_roberta"

    def __init__(self, heads_per_layer=None, intermediate_per_layer=None, **kwargs):
        super().__init__(**kwargs)
        self.heads_per_layer = heads_per_layer
        self.intermediate_per_layer = intermediate_per_layer


class SparseCSERobertaModel(RobertaModel):
    config_class = SparseCSERobertaConfig

    def __init__(self, config, add_pooling_layer=False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _shrink(self, config)


CLASSES = {"bert": (SparseCSEBertConfig, SparseCSEBertModel), "roberta": (SparseCSERobertaConfig, SparseCSERobertaModel)}


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


def load(path, dropout=None):
    """Load a physically pruned export through sparsecse (no remote-code execution)."""
    from transformers.utils import logging as hf_logging

    cfg_cls, model_cls = _config(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # for this load only
    try:
        cfg = cfg_cls.from_pretrained(path)
        if dropout is not None:
            cfg.hidden_dropout_prob = dropout
            cfg.attention_probs_dropout_prob = dropout
        return model_cls.from_pretrained(path, config=cfg), load_tokenizer(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
