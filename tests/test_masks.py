"""Mask invariants on the tiny BERT: identity, head removal, neuron removal, physical pruning equality."""

import copy

import torch

from conftest import make_batch
from sparsecse.method.prune import encoder_params, physical_prune
from sparsecse.method.prune import zero_pruned_weights


def _hidden(enc, ids, att):
    return enc.backbone(input_ids=ids, attention_mask=att).last_hidden_state


def test_masks_act_on_their_own_model_and_reset_exactly(tiny):
    """The hooks read the mask of the encoder they belong to, also after copy.deepcopy (each copy masks itself
    only), and setting the masks back to ones restores the unmasked output bit for bit."""
    ids, att = make_batch(tiny)
    ref = _hidden(tiny, ids, att)
    other = copy.deepcopy(tiny)
    hm = torch.ones_like(tiny.head_mask)
    hm[0, 1] = 0
    other.set_masks(head_mask=hm)
    assert not torch.allclose(_hidden(other, ids, att), ref, atol=1e-4)  # the copy's hook reads the copy's mask
    assert torch.equal(_hidden(tiny, ids, att), ref)  # ... and the original is untouched
    other.set_masks(head_mask=torch.ones_like(hm))
    assert torch.equal(_hidden(other, ids, att), ref)


def test_all_ones_masks_with_gradients_on_are_exact(tiny):
    ids, att = make_batch(tiny)
    ref = _hidden(tiny, ids, att).detach()
    with tiny.mask_grads():  # forces the multiply path
        out = _hidden(tiny, ids, att)
    assert torch.equal(ref, out)


def test_zeroing_a_head_equals_removing_its_contribution(tiny):
    ids, att = make_batch(tiny)
    hm = torch.ones_like(tiny.head_mask)
    hm[1, 2] = 0
    tiny.set_masks(head_mask=hm)
    masked = _hidden(tiny, ids, att)
    # reference: no mask, but the head's columns of the attention output projection zeroed
    ref = copy.deepcopy(tiny)
    ref.set_masks(head_mask=torch.ones_like(hm))
    d = 32 // 4
    with torch.no_grad():
        ref.layers[1].attention.output.dense.weight[:, 2 * d:3 * d] = 0
    assert torch.allclose(masked, _hidden(ref, ids, att), atol=1e-6)
    assert not torch.allclose(masked, _hidden(_unmasked(tiny), ids, att), atol=1e-5)


def _unmasked(enc):
    e = copy.deepcopy(enc)
    e.set_masks(torch.ones_like(enc.head_mask), torch.ones_like(enc.neuron_mask))
    return e


def test_zeroing_a_neuron_equals_dropping_its_output_column(tiny):
    ids, att = make_batch(tiny)
    nm = torch.ones_like(tiny.neuron_mask)
    nm[0, 5] = 0
    tiny.set_masks(neuron_mask=nm)
    masked = _hidden(tiny, ids, att)
    ref = _unmasked(tiny)
    with torch.no_grad():
        ref.layers[0].output.dense.weight[:, 5] = 0
    assert torch.allclose(masked, _hidden(ref, ids, att), atol=1e-6)
    assert not torch.allclose(masked, _hidden(_unmasked(tiny), ids, att), atol=1e-5)


def test_mask_gradients_flow(tiny):
    ids, att = make_batch(tiny)
    with tiny.mask_grads() as (hm, nm):
        tiny(ids, att).pow(2).sum().backward()
        assert hm.grad is not None and hm.grad.abs().sum() > 0
        assert nm.grad is not None and nm.grad.abs().sum() > 0
    assert not tiny.head_mask.requires_grad and not tiny.neuron_mask.requires_grad


def test_masks_are_not_trainable_parameters(tiny):
    names = {n for n, _ in tiny.named_parameters()}
    assert not any("mask" in n for n in names)
    assert {"head_mask", "neuron_mask"} <= {n for n, _ in tiny.named_buffers()}


def test_physically_pruned_equals_masked_including_empty_layers(tiny):
    ids, att = make_batch(tiny)
    hm = torch.ones_like(tiny.head_mask)
    hm[0, :] = 0  # layer 0 loses every head
    hm[1, 1] = 0
    nm = torch.ones_like(tiny.neuron_mask)
    nm[1, :] = 0  # layer 1 loses every neuron
    nm[0, ::3] = 0
    tiny.set_masks(hm, nm)
    zero_pruned_weights(tiny)
    masked = _hidden(tiny, ids, att)
    pruned = physical_prune(tiny)
    out = pruned(input_ids=ids, attention_mask=att).last_hidden_state  # padding-free: zeros at the padding
    pruned.padding_free = False
    stock = pruned(input_ids=ids, attention_mask=att).last_hidden_state
    assert pruned.config.heads_per_layer == [0, 3]
    assert pruned.config.intermediate_per_layer == [37 - 13, 0]
    real = att[..., None].bool()
    assert not real.all() and torch.allclose(masked, stock, atol=1e-5)
    assert torch.allclose(masked * real, out, atol=1e-5) and not out.masked_select(~real).any()
    n_dense = sum(p.numel() for p in tiny.backbone.encoder.parameters())
    n_pruned = sum(p.numel() for p in pruned.encoder.parameters())
    assert n_pruned < n_dense
    # what trials report as the size objective (sweep.objective=pareto), from the masks alone, is what the
    # physically pruned model has — empty layers (no Q/K/V left) included
    assert encoder_params(tiny) == sum(p.numel() for p in pruned.parameters())
    tiny.set_masks(torch.ones_like(hm), torch.ones_like(nm))
    assert encoder_params(tiny) == sum(p.numel() for p in tiny.backbone.parameters())
