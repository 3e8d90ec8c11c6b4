"""The padding-free forward (Encoder._packed_forward) equals the backbone's own padded forward.

Same outputs for every pooler, same gradients for weights and for the masks ξ, ν (what scoring reads), with masks
applied, on BERT and RoBERTa; rows of very different lengths so padding is real."""

from __future__ import annotations

import pytest
import torch

from sparsecse.method.model import Encoder

SENTS = ("a man is playing a guitar on the street corner tonight .", "the cat sleeps", "ok",
         "stocks fell sharply on monday after the central bank raised rates again .")


def _roberta():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, pad_token_id=1)
    return Encoder(RobertaModel(cfg, add_pooling_layer=False), tokenizer=None, pooler="cls")


def _batch(enc, n_extra_pad=3):
    if enc.tokenizer is not None:
        t = enc.tokenize(list(SENTS))
        ids, att = t["input_ids"], t["attention_mask"]
    else:  # RoBERTa: random ids, ragged lengths, pad id 1
        g = torch.Generator().manual_seed(1)
        lengths = torch.tensor([9, 3, 2, 12])
        T = int(lengths.max()) + n_extra_pad
        ids = torch.randint(3, 60, (4, T), generator=g)
        att = (torch.arange(T)[None] < lengths[:, None]).long()
        ids[att == 0] = 1
        ids[:, 0] = 0
    return ids, att


def _both(enc, ids, att, pooler, masks_grad=False):
    outs = []
    for packed in (False, True):
        enc.packed = packed
        enc.zero_grad(set_to_none=True)
        if masks_grad:
            with enc.mask_grads() as (h, n):
                y = enc(ids, att, pooler)
                (y * torch.linspace(-1, 1, y.shape[-1])).pow(2).sum().backward()
                outs.append((y.detach(), h.grad.clone(), n.grad.clone()))
        else:
            y = enc(ids, att, pooler)
            (y * torch.linspace(-1, 1, y.shape[-1])).pow(2).sum().backward()
            grads = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
            outs.append((y.detach(), grads))
    enc.packed = True
    return outs


@pytest.fixture(params=["bert", "roberta"])
def encoder(request, tiny):
    enc = tiny if request.param == "bert" else _roberta()
    enc.eval()  # dropout off: the two forwards draw different dropout masks by design
    g = torch.Generator().manual_seed(3)
    enc.set_masks((torch.rand(enc.head_mask.shape, generator=g) > 0.3).float(),
                  (torch.rand(enc.neuron_mask.shape, generator=g) > 0.3).float())
    return enc


@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "avg"])
def test_packed_forward_equals_padded_forward(encoder, pooler):
    ids, att = _batch(encoder)
    assert (att == 0).any()  # there is padding to skip
    (y0, g0), (y1, g1) = _both(encoder, ids, att, pooler)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("pooler", ["cls_before_pooler", "avg"])
def test_packed_forward_gives_the_same_mask_gradients(encoder, pooler):
    ids, att = _batch(encoder)
    (y0, h0, n0), (y1, h1, n1) = _both(encoder, ids, att, pooler, masks_grad=True)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert h0.abs().sum() > 0 and n0.abs().sum() > 0
    torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(n1, n0, rtol=1e-4, atol=1e-6)


def test_packed_forward_trains_with_dropout(tiny):
    """In train mode it applies dropout (two passes differ, as SimCSE needs) and stays finite."""
    tiny.train()
    ids, att = _batch(tiny)
    a, b = tiny(ids, att), tiny(ids, att)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


@pytest.mark.parametrize("pooler", ["cls_before_pooler", "avg"])
def test_packed_forward_on_a_physically_pruned_model(tiny, pooler):
    """Narrower layers and a layer with no heads left (the export's shapes) run padding-free too."""
    from sparsecse.method.prune import physical_prune
    from sparsecse.method.prune import zero_pruned_weights

    hm = torch.ones_like(tiny.head_mask)
    hm[0] = 0  # layer 0 loses every head
    hm[1, 1] = 0
    nm = torch.ones_like(tiny.neuron_mask)
    nm[1, :20] = 0
    tiny.set_masks(hm, nm)
    zero_pruned_weights(tiny)
    pruned = Encoder(physical_prune(tiny), tiny.tokenizer, pooler="cls_before_pooler").eval()
    assert pruned.physical and pruned.backbone.config.heads_per_layer == [0, 3]
    ids, att = _batch(tiny)
    (y0, _), (y1, _) = _both(pruned, ids, att, pooler)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    tiny.eval()
    torch.testing.assert_close(y1, tiny(ids, att, pooler).detach(), rtol=1e-4, atol=1e-5)  # = the masked model


def test_backbones_it_does_not_handle_fall_back_to_their_own_forward(tiny):
    """A layer class the packed forward does not reimplement runs the backbone's own forward, with the same
    outputs; asking for the packed forward on it is a clear error, not a silent wrong answer."""
    import copy

    from sparsecse import SparseCSEError
    from sparsecse.method.packed import why_not

    assert tiny.packed and why_not(tiny.backbone, tiny.adapter) is None
    bb = copy.deepcopy(tiny.backbone).eval()
    layer = bb.encoder.layer[1]
    layer.__class__ = type("MyLayer", (type(layer),), {})  # e.g. a user's subclass with its own forward
    enc = Encoder(bb, tiny.tokenizer, pooler="avg")
    assert not enc.packed and "MyLayer" in why_not(bb, enc.adapter)
    ids, att = _batch(tiny)
    tiny.eval()
    torch.testing.assert_close(enc(ids, att), tiny(ids, att, "avg"), rtol=1e-5, atol=1e-5)
    with pytest.raises(SparseCSEError, match="padding-free forward does not support.*MyLayer"):
        enc.packed = True
    chunked = copy.deepcopy(tiny.backbone)
    chunked.config.chunk_size_feed_forward = 4
    assert "chunked" in why_not(chunked, enc.adapter)
    decoder = copy.deepcopy(tiny.backbone)
    decoder.config.is_decoder = True
    assert not Encoder(decoder, tiny.tokenizer).packed
