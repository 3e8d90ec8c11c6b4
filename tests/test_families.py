"""Every supported encoder family, without the hub: a tiny random-weight model built from the family's own config
class (with the packaged MiniLM tokenizer), masked and pruned the same way. One parametrised module: masked forward
= zeroed weights = physically pruned forward (fully masked layers included), mask gradients = finite differences,
the magnitude control, the export through AutoModel and sentence-transformers, and a one-step SimCSE run."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsecse import SparseCSEError

FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "mpnet", "distilbert", "modernbert"]
TOKENS = {"pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}  # the MiniLM (BERT) vocabulary's ids


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=30522, max_position_embeddings=128, **TOKENS)
    if family == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, dropout=0.1, attention_dropout=0.1,
                                   pad_token_id=0, vocab_size=30522, max_position_embeddings=128)
    if family == "modernbert":
        return tf.ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                   global_attn_every_n_layers=2, local_attention=16, cls_token_id=101,
                                   sep_token_id=102, attention_dropout=0.1, mlp_dropout=0.1, attention_bias=True,
                                   mlp_bias=True, norm_bias=True, **common)  # biases: a headless layer keeps one
    cls = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig,
           "electra": tf.ElectraConfig, "mpnet": tf.MPNetConfig}[family]
    extra = {"embedding_size": 16} if family == "electra" else {}  # ELECTRA projects its embeddings up
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **extra, **common)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    from transformers import AutoModel, AutoTokenizer

    from sparsecse.method.model import default_model_path

    torch.manual_seed(0)
    model = AutoModel.from_config(_config(request.param))
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(d)
    return request.param, d


SENTENCES = ["a man is playing a guitar .", "the cat sleeps on the warm mat", "stocks fell sharply"]


def _encoder(d, pooler="cls_before_pooler"):
    from sparsecse.method.model import load_encoder

    return load_encoder(str(d), pooler=pooler).eval()


def _masks(enc, full_layer: bool = False):
    hm, nm = torch.ones_like(enc.head_mask), torch.ones_like(enc.neuron_mask)
    hm[0, 1], hm[1, 3], nm[0, :10], nm[1, 5:9] = 0, 0, 0, 0
    if full_layer:  # no heads left in layer 0, no neurons in layer 1
        hm[0], nm[1] = 0, 0
    return hm, nm


def _states(enc, batch):
    return enc.backbone(**batch).last_hidden_state


@pytest.mark.parametrize("full_layer", [False, True])
def test_masked_equals_zeroed_equals_physically_pruned(family_dir, full_layer):
    from sparsecse.method.prune import encoder_params, physical_prune, zero_pruned_weights

    family, d = family_dir
    enc = _encoder(d)
    batch = enc.tokenize(SENTENCES)
    dense = _states(enc, batch)
    enc.set_masks(*_masks(enc, full_layer))
    masked = _states(enc, batch)
    assert not torch.allclose(masked, dense, atol=1e-4)  # the masks act
    zeroed = copy.deepcopy(enc)
    zero_pruned_weights(zeroed)
    zeroed.set_masks(torch.ones_like(enc.head_mask), torch.ones_like(enc.neuron_mask))
    torch.testing.assert_close(_states(zeroed, batch), masked, atol=1e-5, rtol=1e-4)
    pruned = physical_prune(enc)
    real = batch["attention_mask"][..., None].bool()  # its own forward runs padding-free: zeros at the padding
    torch.testing.assert_close(pruned(**batch).last_hidden_state, masked * real, atol=1e-5, rtol=1e-4)
    pruned.padding_free = False
    torch.testing.assert_close(pruned(**batch).last_hidden_state, masked, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) == encoder_params(enc)  # the size the sweep reports


def test_mask_gradients_equal_finite_differences(family_dir):
    family, d = family_dir
    enc = _encoder(d).double()
    batch = enc.tokenize(SENTENCES)

    w = torch.randn(len(SENTENCES), enc.backbone.config.hidden_size, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)

    def loss() -> torch.Tensor:  # not the squared norm: a final LayerNorm makes that constant
        return (enc(**batch) * w).sum()

    with enc.mask_grads() as (hm, nm):
        loss().backward()
        gh, gn = hm.grad.clone(), nm.grad.clone()
    # the head and the neuron of layer 0 the loss is most sensitive to (a random net has near-dead units)
    picks = [(enc.head_mask, (0, int(gh[0].abs().argmax())), gh), (enc.neuron_mask, (0, int(gn[0].abs().argmax())), gn)]
    eps = 1e-3  # central differences: O(eps²) error; ModernBERT's rotary tables are float32 even in a float64 net
    for mask, idx, grad in picks:
        with torch.no_grad():
            mask[idx] = 1 + eps
            up = loss().item()
            mask[idx] = 1 - eps
            down = loss().item()
            mask[idx] = 1
        assert abs(grad[idx].item()) > 1e-6
        assert grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4)


def test_the_magnitude_control_scores_each_unit_by_its_own_weights(family_dir):
    from sparsecse.method.model import head_dim
    from sparsecse.method.score import magnitude_importance

    family, d = family_dir
    enc = _encoder(d)
    head, neuron = magnitude_importance(enc)
    a, layer, dh = enc.adapter, enc.layers[1], head_dim(enc.backbone.config)
    want = sum(lin.weight[rows].pow(2).sum() + (lin.bias[rows].pow(2).sum() if lin.bias is not None else 0)
               for lin, rows in a.head_rows(layer, torch.tensor([2]), dh, 4))
    want += a.get(layer, "attn_out").weight[:, 2 * dh:3 * dh].pow(2).sum()
    assert head.shape == (2, 4) and head[1, 2] == pytest.approx(float(want.sqrt()), rel=1e-5)
    size = enc.neuron_mask.shape[1]
    rows = a.neuron_rows(layer, torch.tensor([5]), size)
    want_n = sum(lin.weight[r].pow(2).sum() + (lin.bias[r].pow(2).sum() if lin.bias is not None else 0)
                 for lin, r in rows) + a.get(layer, "ffn_out").weight[:, 5].pow(2).sum()
    assert neuron.shape == (2, 37) and neuron[1, 5] == pytest.approx(float(want_n.sqrt()), rel=1e-5)


def test_export_loads_in_automodel_and_sentence_transformers_with_the_masked_embeddings(family_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from sparsecse.ops.export import export_model

    family, d = family_dir
    enc = _encoder(d)
    enc.set_masks(*_masks(enc, full_layer=True))
    want = enc(**enc.tokenize(SENTENCES))
    out = export_model(enc, tmp_path / "export", pooler="cls_before_pooler")
    pruned = AutoModel.from_pretrained(out / "pruned", trust_remote_code=True).eval()
    got = pruned(**enc.tokenize(SENTENCES)).last_hidden_state[:, 0]
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.9999
    st = SentenceTransformer(str(out / "pruned"), device="cpu", trust_remote_code=True)
    emb = torch.as_tensor(st.encode(SENTENCES))
    assert torch.nn.functional.cosine_similarity(emb, want).min() >= 0.9999
    dense = SentenceTransformer(str(out), device="cpu")
    assert torch.nn.functional.cosine_similarity(torch.as_tensor(dense.encode(SENTENCES)), want).min() >= 0.9999
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in enc.backbone.parameters())
    # on a padded batch the export runs padding-free (packed.py ships beside its modeling file): the stock forward's
    # states on the real tokens, zeros at the padding; asked for anything more, it runs the stock forward
    batch = enc.tokenize(SENTENCES)
    real = batch["attention_mask"][..., None].bool()
    free = pruned(**batch).last_hidden_state
    assert (out / "pruned" / "packed.py").is_file() and pruned._padding_free_why_not is None
    assert "zeros at the padded positions" in (out / "pruned" / "README.md").read_text()  # the card says so
    assert not real.all() and not free.masked_select(~real).any()
    stock = pruned(**batch, output_hidden_states=True).last_hidden_state
    assert stock.masked_select(~real).abs().sum() > 0
    torch.testing.assert_close(free, stock * real, atol=1e-5, rtol=1e-4)
    st[0].auto_model.padding_free = False  # sentence-transformers' embeddings are the same either way
    padded = torch.as_tensor(st.encode(SENTENCES))
    assert torch.nn.functional.cosine_similarity(padded, emb).min() >= 0.99999
    # the smaller model runs the dense model's attention kernel: under sentence-transformers the same attention
    # implementation, and where that is SDPA, one scaled_dot_product_attention call per layer that has heads
    impl = dense[0].auto_model.config._attn_implementation
    assert st[0].auto_model.config._attn_implementation == impl
    if impl == "sdpa":
        calls, real = [], torch.nn.functional.scaled_dot_product_attention

        def counted(*args, **kwargs):
            calls.append(args[0].shape[1])  # (batch, heads, tokens, head dim)
            return real(*args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = counted
        try:
            st.encode(SENTENCES[:1])
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
        assert calls == [h for h in pruned.config.heads_per_layer if h], (family, calls)


def test_one_simcse_step_trains_every_family(family_dir, tiny_data_dir, tmp_path):
    from sparsecse.core.config import load_config
    from sparsecse.method.model import load_encoder
    from sparsecse.method.train import train_simcse

    family, d = family_dir
    cfg = load_config(None, [f"model.name={d}", "train.batch_size=8", "train.max_len=16", "train.max_steps=1",
                             "train.eval_steps=1", "train.eval_max_pairs=20", "data.max_train_sentences=16"])
    enc = _encoder(d, pooler="cls")
    enc.set_masks(*_masks(enc))
    before = copy.deepcopy(enc.backbone.state_dict())
    res = train_simcse(cfg, tmp_path / "run", tiny_data_dir, init=enc, progress=False)
    assert res.steps == 1 and res.best_dir is not None
    best = load_encoder(str(res.best_dir))
    assert torch.equal(best.head_mask, enc.head_mask)
    changed = [k for k, v in best.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the step moved the weights


def test_the_padding_free_forward_matches_the_families_own(family_dir):
    """Every family runs padding-free — BERT's layers and those transformers copies from them (RoBERTa, XLM-R,
    ELECTRA, whose embeddings are projected up to the hidden width first), DistilBERT's, MPNet's (its
    relative-position bias added to the scores, a pruned layer's kept heads' rows) and ModernBERT's (rotary
    positions, a sliding-window layer, pre-LayerNorm and a final norm) — masked and physically pruned (a layer left
    without heads, one without neurons), with either pooling, equal to the family's own padded forward."""
    from sparsecse.method.model import Encoder
    from sparsecse.method.prune import physical_prune, zero_pruned_weights

    family, d = family_dir
    enc = _encoder(d)
    assert enc.packed
    with torch.no_grad():  # biases as a trained model has them (initialised to zero): a headless layer keeps one
        for name, p in enc.backbone.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hm, nm = _masks(enc, full_layer=True)
    hm[1, 0] = 0  # layer 1 keeps heads 1 and 2: not the first ones (MPNet's pruned layer takes their bias rows)
    enc.set_masks(hm, nm)
    # a sentence longer than ModernBERT's window here (local_attention 16: keys within 8 of the query) beside
    # short ones: its sliding-window layer sees a window, not the whole sentence
    batch = enc.tokenize(SENTENCES + ["the quick brown fox jumps over the lazy dog while the old farmer watches "
                                      "from the porch of his house near the river"])
    assert batch["input_ids"].shape[1] > 2 * 8 + 1
    zero_pruned_weights(enc)
    pruned = Encoder(physical_prune(enc), enc.tokenizer).eval()
    assert pruned.packed
    for pooler in ("cls_before_pooler", "avg"):
        for model in (enc, pruned):
            model.packed = True
            packed = model(**batch, pooler=pooler)
            model.packed = False
            torch.testing.assert_close(packed, model(**batch, pooler=pooler), atol=1e-5, rtol=1e-4)


def test_a_modernbert_the_padding_free_forward_does_not_recognise_is_named_not_run():
    """ModernBERT's padding-free step relies on its modules as transformers builds them (rotary_emb per layer type,
    attention_type, Wqkv/Wo/head_dim); where one differs, why_not names it and the backbone's own forward runs."""
    from transformers import AutoModel

    from sparsecse.method.model import ADAPTERS
    from sparsecse.method.packed import why_not

    def reason(change):
        model = AutoModel.from_config(_config("modernbert"))
        change(model)
        return why_not(model, ADAPTERS["modernbert"])

    assert reason(lambda m: None) is None
    assert "attention_type" in reason(lambda m: setattr(m.layers[1], "attention_type", "chunked_attention"))
    assert "head_dim" in reason(lambda m: setattr(m.layers[0].attn, "head_dim", None))
    assert "rotary_emb" in reason(lambda m: setattr(m, "rotary_emb", torch.nn.Identity()))
    assert "final_norm" in reason(lambda m: delattr(m, "final_norm"))


def test_an_unsupported_family_is_one_line_naming_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2Model

    from sparsecse.method.model import load_encoder

    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(SparseCSEError) as e:
        load_encoder(str(tmp_path))
    msg = str(e.value)
    assert "model_type 'gpt2' is not supported" in msg and "\n" not in msg
    assert all(f in msg for f in FAMILIES) and "sparsecse_" not in msg


@pytest.mark.slow
def test_the_pruned_export_runs_in_onnx_runtime_with_the_masked_embeddings(family_dir, tmp_path):
    """Every family's physically pruned graph exports (torch.onnx, dynamo) and ONNX Runtime gives the masked
    model's embeddings (fp32); the int8 file is written beside it."""
    from sparsecse.ops.onnx_export import OnnxEncoder
    from sparsecse.method.evaluate import encode
    from sparsecse.ops.export import export_model

    family, d = family_dir
    enc = _encoder(d)
    enc.set_masks(*_masks(enc, full_layer=True))
    want = enc(**enc.tokenize(SENTENCES))
    out = export_model(enc, tmp_path / "export", pooler="cls_before_pooler", onnx=True)
    assert (out / "pruned" / "onnx" / "model_qint8.onnx").is_file()
    emb = encode(OnnxEncoder(out / "pruned", "onnx/model.onnx", pooler="cls_before_pooler"), SENTENCES, batch_size=8)
    got = torch.stack([torch.as_tensor(emb[s]) for s in SENTENCES])
    assert torch.nn.functional.cosine_similarity(got, want.float()).min() >= 0.9999
    # the post-LayerNorm families get the fused graph (an Attention node per layer that has heads, each with its own
    # head count; MPNet's with its relative-position bias, test_onnx); ModernBERT goes through torch's exporter, and
    # the model card says why
    import onnx

    from sparsecse.ops.onnx_fused import NOT_FUSED

    nodes = onnx.load(str(out / "pruned" / "onnx" / "model.onnx")).graph.node
    heads = [a.i for n in nodes if n.op_type in ("Attention", "MultiHeadAttention") for a in n.attribute
             if a.name == "num_heads"]
    card = (out / "pruned" / "README.md").read_text()
    if family in NOT_FUSED:
        assert not heads and NOT_FUSED[family] in card
    else:
        kept = enc.head_mask.sum(1).int().tolist()
        assert heads == [h for h in kept if h] and "fused transformer ops" in card, (heads, kept)
