"""Scoring, pruning, rewinding, training and export on the tiny BERT (fast, CPU)."""

import json

import numpy as np
import pytest
import torch

from sparsecse import SparseCSEError
from sparsecse.method.data import Pairs
from sparsecse.method.model import load_encoder, save_encoder, weights_fingerprint
from sparsecse.method.prune import rewind, select_masks
from sparsecse.method.score import compute_scores, load_scores, save_scores, score_loss
from sparsecse.method.train import checkpoint_weights

PAIRS = Pairs(
    ["a man is playing a guitar .", "a woman is slicing an onion .", "the cat sleeps on the sofa .",
     "stocks fell sharply on monday .", "a child rides a bike .", "two dogs run in a field ."],
    ["a man plays the guitar .", "someone is cutting an onion .", "a dog barks at the mailman .",
     "markets dropped on monday .", "the weather is cold today .", "dogs are running through grass ."],
    np.array([4.8, 4.2, 0.5, 4.0, 0.2, 4.5]),
)


def _scores(enc, bs=3):
    return compute_scores(enc, PAIRS, batch_size=bs, pooler="cls_before_pooler")


def test_taylor_scores_equal_finite_differences(tiny):
    """|∂L/∂ξ| from autograd equals |central finite difference of L_score in ξ| (one batch, λ=0.5)."""
    enc = tiny.double()
    sc = compute_scores(enc, PAIRS, batch_size=6, pooler="cls_before_pooler")
    head, neuron = sc.importance(0.5)

    def loss():
        tok = enc.tokenize(PAIRS.s1 + PAIRS.s2)
        with torch.no_grad():
            z = enc(tok["input_ids"], tok["attention_mask"], pooler="cls_before_pooler")
        a, u = score_loss(z[:6], z[6:], torch.as_tensor(PAIRS.gold > 4.0))
        return float(0.5 * a + 0.5 * u)

    eps = 1e-5
    for (buf, idx, expected) in ((enc.head_mask, (1, 2), head[1, 2]), (enc.neuron_mask, (0, 7), neuron[0, 7])):
        orig = buf[idx].item()
        buf[idx] = orig + eps
        up = loss()
        buf[idx] = orig - eps
        down = loss()
        buf[idx] = orig
        assert abs(abs(up - down) / (2 * eps) - expected) < 1e-6 * max(1.0, expected)


def test_lambda_combination_from_stored_gradients_equals_direct(tiny, tmp_path):
    sc = _scores(tiny)
    path = save_scores(sc, tmp_path / "s.parquet")
    back = load_scores(path, expect_fingerprint=weights_fingerprint(tiny))
    for lam in (0.25, 0.75):
        # direct: score at this λ by differentiating λ·L_align + (1−λ)·L_uniform batch by batch
        order = np.random.default_rng(0).permutation(len(PAIRS))
        direct = np.zeros_like(tiny.head_mask.numpy(), dtype=np.float64)
        batches = [order[i:i + 3] for i in range(0, len(order), 3)]
        tiny.eval()
        with tiny.mask_grads() as (hm, nm):
            for b in batches:
                tok = tiny.tokenize([PAIRS.s1[i] for i in b] + [PAIRS.s2[i] for i in b])
                z = tiny(tok["input_ids"], tok["attention_mask"], pooler="cls_before_pooler")
                a, u = score_loss(z[:len(b)], z[len(b):], torch.as_tensor(PAIRS.gold[b] > 4.0))
                g, = torch.autograd.grad(lam * a + (1 - lam) * u, [hm])
                direct += g.abs().double().numpy()
        assert np.allclose(back.importance(lam)[0], direct / len(batches), rtol=1e-5, atol=1e-9)


def test_scores_file_refusals(tiny, tiny_model_dir, tmp_path):
    path = save_scores(_scores(tiny), tmp_path / "s.parquet")
    with pytest.raises(SparseCSEError, match="another model"):
        load_scores(path, expect_fingerprint="0" * 64)
    data = path.read_bytes()
    trunc = tmp_path / "t.parquet"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparseCSEError, match="not a readable"):
        load_scores(trunc)
    with pytest.raises(SparseCSEError, match="not found"):
        load_scores(tmp_path / "missing.parquet")


def test_rewound_weights_bit_equal_pretrained_except_masked_units(tiny_model_dir):
    pre = load_encoder(str(tiny_model_dir))
    hm = torch.ones(2, 4)
    hm[0, 1] = 0
    nm = torch.ones(2, 37)
    nm[1, 3] = 0
    enc = rewind(str(tiny_model_dir), hm, nm)
    d = 8
    ref, got = pre.backbone.state_dict(), enc.backbone.state_dict()
    for k, v in ref.items():
        w = got[k]
        if k == "encoder.layer.0.attention.self.query.weight":
            assert torch.equal(w[d:2 * d], torch.zeros_like(w[d:2 * d]))
            assert torch.equal(torch.cat([w[:d], w[2 * d:]]), torch.cat([v[:d], v[2 * d:]]))
        elif k == "encoder.layer.1.output.dense.weight":
            assert torch.equal(w[:, 3], torch.zeros_like(w[:, 3]))
            keep = [i for i in range(37) if i != 3]
            assert torch.equal(w[:, keep], v[:, keep])
        elif k.startswith("encoder.layer.0.attention") or k.startswith("encoder.layer.1.intermediate") \
                or k.startswith("encoder.layer.1.output.dense"):
            continue  # partly pruned tensors: checked above for representative ones
        else:
            assert torch.equal(w, v), k


def _tiny_cfg(tiny_model_dir, **train):
    from sparsecse.core.config import load_config

    sets = [f"model.name={tiny_model_dir}", "train.batch_size=8", "train.max_len=16", "train.eval_steps=3",
            "train.eval_max_pairs=40", "train.lr=1e-3", "data.max_train_sentences=64"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, sets)


def test_simcse_training_keeps_pruned_units_exactly_zero_and_checkpoints(tiny_model_dir, tiny_data_dir, tmp_path):
    from sparsecse.method.train import train_simcse

    cfg = _tiny_cfg(tiny_model_dir, max_steps=4)
    hm = torch.ones(2, 4)
    hm[1, 0] = 0
    nm = torch.ones(2, 37)
    nm[0, :10] = 0
    enc = rewind(str(tiny_model_dir), hm, nm)
    res = train_simcse(cfg, tmp_path / "run", tiny_data_dir, init=enc, progress=False)
    assert res.steps == 4 and res.best_dir is not None
    assert [h["step"] for h in res.history] == [3, 4]
    best = load_encoder(str(res.best_dir))
    assert torch.equal(best.head_mask, hm) and torch.equal(best.neuron_mask, nm)
    sd = best.backbone.state_dict()
    assert sd["encoder.layer.1.attention.output.dense.weight"][:, :8].abs().sum() == 0
    assert sd["encoder.layer.0.intermediate.dense.weight"][:10].abs().sum() == 0
    assert sd["encoder.layer.0.output.dense.weight"][:, :10].abs().sum() == 0
    assert (tmp_path / "run" / "best" / "manifest.json").exists()
    meta = json.loads((tmp_path / "run" / "best" / "sparsecse.json").read_text())
    assert meta["step"] in (3, 4) and "init_fingerprint" in meta


def test_training_resumes_from_latest_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    from sparsecse.method.train import OnReport, train_simcse

    cfg = _tiny_cfg(tiny_model_dir, max_steps=6, dropout=0.0, checkpoint_every=1)
    full = train_simcse(cfg, tmp_path / "a", tiny_data_dir, progress=False)
    stop = _stop_after(3)
    with pytest.raises(stop.Stop):  # the process "dies" right after the step-3 checkpoint
        train_simcse(cfg, tmp_path / "b", tiny_data_dir, progress=False, callbacks=[OnReport(stop)])
    resumed = train_simcse(cfg, tmp_path / "b", tiny_data_dir, progress=False, resume_dir=tmp_path / "b" / "latest")
    assert [h["step"] for h in resumed.history] == [3, 6]
    a = load_encoder(str(checkpoint_weights(tmp_path / "a" / "latest"))).backbone.state_dict()
    b = load_encoder(str(checkpoint_weights(tmp_path / "b" / "latest"))).backbone.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert full.steps == resumed.steps == 6


def test_checkpoints_store_each_weight_set_once_and_the_final_one_no_optimizer(tiny_model_dir, tiny_data_dir,
                                                                                tmp_path):
    """A checkpoint leaves out model/ when best/ holds the same step's weights, and the final one leaves out model/
    and the optimizer state; both still resume: a mid-run checkpoint without model/ continues from best/'s weights, the final
    one resumes to its own end (nothing left to train) and refuses to train further with a one-line error."""
    from sparsecse.method.train import OnReport, train_simcse

    seen = []

    def inspect(rec, ckpt):
        st = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        seen.append((rec["step"], rec["stsb_dev"] == rec["best_stsb_dev"], (ckpt / "model").is_dir(),
                     "optimizer" in st, (ckpt / "best").is_dir()))

    cfg = _tiny_cfg(tiny_model_dir, max_steps=6, eval_steps=1, lr=3e-3, dropout=0.0, checkpoint_every=1)
    full = train_simcse(cfg, tmp_path / "a", tiny_data_dir, progress=False, callbacks=[OnReport(inspect)])
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5, 6]
    for step, new_best, has_model, has_opt, has_best in seen:
        assert has_model == (not new_best and step != 6) and has_opt == (step != 6) and has_best, (step, new_best)
    assert {s[1] for s in seen} == {True, False}  # both kinds occurred (lr 3e-3 makes dev go up and down)
    # resuming from a checkpoint whose weights live in best/ gives the uninterrupted run's final weights
    mid = next(s[0] for s in seen if s[1] and s[0] < 6)
    stop = _stop_after(mid)
    with pytest.raises(stop.Stop):
        train_simcse(cfg, tmp_path / "b", tiny_data_dir, progress=False, callbacks=[OnReport(stop)])
    assert not (tmp_path / "b" / "latest" / "model").exists()
    resumed = train_simcse(cfg, tmp_path / "b", tiny_data_dir, progress=False, resume_dir=tmp_path / "b" / "latest")
    assert resumed.steps == 6 and resumed.best_dev == pytest.approx(full.best_dev, abs=1e-6)
    a = load_encoder(str(checkpoint_weights(tmp_path / "a" / "latest"))).backbone.state_dict()
    b = load_encoder(str(checkpoint_weights(tmp_path / "b" / "latest"))).backbone.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the final checkpoint: resumes to its own end, refuses more steps
    again = train_simcse(cfg, tmp_path / "c", tiny_data_dir, progress=False, resume_dir=tmp_path / "a" / "latest")
    assert again.steps == 6 and again.best_dev == full.best_dev
    more = cfg.replace(train=type(cfg.train)(**{**cfg.to_dict()["train"], "max_steps": 8}))
    with pytest.raises(SparseCSEError, match="final checkpoint of a run that ended at step 6.*cannot train on"):
        train_simcse(more, tmp_path / "d", tiny_data_dir, progress=False, resume_dir=tmp_path / "a" / "latest")


def _stop_after(step):
    class Stop(Exception):
        pass

    def report(rec, ckpt):
        if rec["step"] >= step:
            raise Stop()

    report.Stop = Stop
    return report


def test_non_finite_loss_stops_with_clear_error(tiny_model_dir, tiny_data_dir, tmp_path):
    from sparsecse.method.train import train_simcse

    cfg = _tiny_cfg(tiny_model_dir, max_steps=3, temperature=1e-45)
    with pytest.raises(SparseCSEError, match="non-finite"):
        train_simcse(cfg, tmp_path / "nan", tiny_data_dir, progress=False)


def test_export_round_trips_through_automodel_and_sentence_transformers(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from sparsecse.ops.export import export_model

    enc = load_encoder(str(tiny_model_dir), pooler="cls_before_pooler")
    hm, nm = torch.ones(2, 4), torch.ones(2, 37)
    hm[0] = 0  # a layer with no heads
    hm[1, 2] = 0
    nm[1, ::2] = 0
    enc = rewind(enc, hm, nm)
    src = save_encoder(enc, tmp_path / "masked", {"sparsity": 0.3, "lam": 0.5})
    out = export_model(str(src), tmp_path / "exp", pooler="cls_before_pooler", results={"STSBenchmark": 1.0, "avg": 1.0})
    sents = ["a man is playing a guitar .", "stocks fell sharply"]
    masked = load_encoder(str(src), pooler="cls_before_pooler").eval()
    tok = masked.tokenize(sents)
    with torch.no_grad():
        ref = masked(tok["input_ids"], tok["attention_mask"])
        dense = AutoModel.from_pretrained(out).eval()(**tok).last_hidden_state[:, 0]
        phys = AutoModel.from_pretrained(out / "pruned", trust_remote_code=True).eval()(**tok).last_hidden_state[:, 0]
    assert torch.allclose(dense, ref, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(phys, ref).min() >= 0.9999
    # the dense export is a complete BertModel: nothing newly initialised, pooler_output = SimCSE's MLP pooler
    hf, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    train_pooler = load_encoder(str(src), pooler="cls").eval()
    with torch.no_grad():
        assert torch.allclose(hf.eval()(**tok).pooler_output, train_pooler(tok["input_ids"], tok["attention_mask"]),
                              atol=1e-5)
    for path, kw in ((out, {}), (out / "pruned", {"trust_remote_code": True})):
        st = SentenceTransformer(str(path), device="cpu", **kw)
        emb = st.encode(sents, convert_to_tensor=True)
        assert torch.nn.functional.cosine_similarity(emb.cpu(), ref).min() >= 0.9999
    via_lib = load_encoder(str(out / "pruned"), pooler="cls_before_pooler").eval()
    with torch.no_grad():
        assert torch.allclose(via_lib(tok["input_ids"], tok["attention_mask"]), ref, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "30% of heads and FFN neurons pruned" in card and "| lam | 0.5 |" in card and "| STS-B | Avg. |" in card
    assert (out / "manifest.json").exists()


def test_export_with_mlp_pooler_loads_in_sentence_transformers(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from sparsecse.ops.export import export_model

    enc = load_encoder(str(tiny_model_dir), pooler="cls")
    out = export_model(enc, tmp_path / "exp", pooler="cls")
    tok = enc.tokenize(["hello world"])
    with torch.no_grad():
        ref = enc.eval()(tok["input_ids"], tok["attention_mask"])
    emb = SentenceTransformer(str(out), device="cpu").encode(["hello world"], convert_to_tensor=True)
    assert torch.allclose(emb.cpu(), ref, atol=1e-5)


def test_crash_during_export_leaves_previous_version(tiny_model_dir, tmp_path, monkeypatch):
    import sparsecse.ops.export as ex

    enc = load_encoder(str(tiny_model_dir))
    out = ex.export_model(enc, tmp_path / "exp")
    before = (out / "manifest.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_model_card", boom)
    with pytest.raises(RuntimeError):
        ex.export_model(enc, tmp_path / "exp")
    assert (out / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp")]


def test_corrupted_checkpoint_is_refused(tiny_model_dir, tmp_path):
    enc = load_encoder(str(tiny_model_dir))
    d = save_encoder(enc, tmp_path / "ck")
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\0" * 16)
    with pytest.raises(SparseCSEError, match="does not match"):
        load_encoder(str(d))


def test_selected_masks_have_exact_counts_on_real_architecture_shapes():
    rng = np.random.default_rng(0)
    hm, nm = select_masks(rng.random((6, 12)), rng.random((6, 1536)), 0.3)
    assert int((hm == 0).sum()) == 22 and int((nm == 0).sum()) == 2765


def test_bf16_precision_trains_under_autocast_and_stays_close_to_fp32(tiny_model_dir, tiny_data_dir, tmp_path):
    from sparsecse.core.config import load_config
    from sparsecse.method.data import collate
    from sparsecse.method.train import simcse_loss, train_simcse

    enc = load_encoder(str(tiny_model_dir), dropout=0.0).train()  # no dropout: the two runs see the same views
    tok = enc.tokenizer(["a cat sat on the mat", "stocks fell sharply today", "the rain in spain", "hello"],
                        truncation=True, max_length=16)
    batch = collate([{"input_ids": ids} for ids in tok["input_ids"]], enc.tokenizer.pad_token_id)
    lo = {}
    for prec in ("fp32", "bf16"):
        enc.zero_grad()
        loss = simcse_loss(enc, batch, 0.05, precision=prec)
        loss.backward()
        lo[prec] = (loss.item(), enc.backbone.encoder.layer[0].intermediate.dense.weight.grad.clone())
    assert lo["bf16"][0] != lo["fp32"][0]  # autocast really ran the encoder in bf16 ...
    assert lo["bf16"][0] == pytest.approx(lo["fp32"][0], rel=5e-2)  # ... and the loss stayed close
    g32, g16 = lo["fp32"][1], lo["bf16"][1]
    assert torch.isfinite(g16).all() and torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), 0) > 0.5  # bf16 noise, same direction
    cfg = _tiny_cfg(tiny_model_dir, max_steps=2, precision="bf16")
    res = train_simcse(cfg, tmp_path / "bf16", tiny_data_dir, progress=False)
    assert res.steps == 2 and all(np.isfinite(h["stsb_dev"]) for h in res.history)
    with pytest.raises(SparseCSEError, match=r"train\.precision.*not one of auto, fp32, bf16"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_gets_an_equal_slice_of_every_global_batch(world):
    """The all-gather of negatives needs equal slices on every rank: an epoch's last short batch is cut to a
    multiple of the world size (at most world − 1 sentences skipped), full batches are split evenly."""
    from sparsecse.method.train import global_batches, rank_slice

    for n in range(5, 45):
        batches = list(global_batches(n, 8, 3, seed=1, world=world))
        for b in batches:
            parts = [rank_slice(b, r, world) for r in range(world)]
            assert len({len(p) for p in parts}) == 1 and len(parts[0]) >= 1  # world × per-rank = the batch
            assert np.array_equal(np.concatenate(parts), b)
        per_epoch = sum(len(b) for b in batches) / 3
        assert n - per_epoch <= world - 1 + (1 if n % 8 == 1 else 0)  # a lone last sentence (no pair) is dropped
    with_one = list(global_batches(19, 8, 1, seed=1))
    assert [len(b) for b in with_one] == [8, 8, 3]  # one worker: nothing cut


def test_every_dev_evaluation_reads_the_selection_data_the_config_names(tiny_model_dir, tiny_data_dir, tmp_path):
    """sweep.select_on: the dev score that picks the checkpoint is the Spearman on that data (here a user file of
    SICK-R pairs), not STS-B dev."""
    from sparsecse.core.config import load_config
    from sparsecse.method.data import load_sick, selection_pairs
    from sparsecse.method.evaluate import evaluate_pairs
    from sparsecse.method.train import train_simcse

    sick = load_sick(tiny_data_dir, "test")
    mine = tmp_path / "sick.tsv"
    mine.write_text("".join(f"{a}\t{b}\t{g}\n" for a, b, g in zip(sick.s1[:40], sick.s2[:40], sick.gold[:40])))
    base = _tiny_cfg(tiny_model_dir, max_steps=3)
    cfg = load_config(None, [f"{k}={v}" for k, v in (("model.name", tiny_model_dir), ("train.batch_size", 8),
                                                       ("train.max_len", 16), ("train.eval_steps", 3),
                                                       ("train.eval_max_pairs", 40), ("train.lr", 1e-3),
                                                       ("train.max_steps", 3), ("data.max_train_sentences", 64),
                                                       ("sweep.select_on", str(mine)))])
    res = train_simcse(cfg, tmp_path / "a", tiny_data_dir, progress=False)
    ref = train_simcse(base, tmp_path / "b", tiny_data_dir, progress=False)
    best = load_encoder(str(res.best_dir))
    want = evaluate_pairs(best, selection_pairs(tiny_data_dir, str(mine)), pooler=cfg.model.eval_pooler)
    assert res.history[-1]["stsb_dev"] == pytest.approx(want, abs=1e-6)
    assert res.history[-1]["stsb_dev"] != pytest.approx(ref.history[-1]["stsb_dev"], abs=1e-3)
