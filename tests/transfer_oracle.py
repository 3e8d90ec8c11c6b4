"""The oracle of the batched transfer classifier (sparsecse/method/classifier.py): SentEval's PyTorch classifier
with nhid 0, fitted one regulariser and one fold after another. The package runs the batched protocol only; this
sequential twin lives with the tests that check the batched one fit for fit (and with the benchmark that times
them side by side)."""

from __future__ import annotations

import numpy as np

from sparsecse.method.classifier import L2_GRID, SEED
from sparsecse.method.transfer import Learner


class TorchLogReg:
    """SentEval's PyTorchClassifier with nhid = 0: Linear + cross-entropy, Adam with weight decay `l2`; trains in
    rounds of `epoch_size` epochs, keeps the model with the best validation accuracy, stops after `tenacity` rounds
    without improvement (at most `max_epoch` epochs)."""

    def __init__(self, l2: float, batch_size: int = 64, tenacity: int = 5, epoch_size: int = 4, max_epoch: int = 200,
                 seed: int = SEED):
        self.l2, self.batch_size, self.tenacity, self.epoch_size, self.max_epoch = l2, batch_size, tenacity, epoch_size, max_epoch
        self.seed = seed

    def fit(self, X, y, val=None, validation_split: float = 0.05) -> "TorchLogReg":
        import copy

        import torch

        rng = np.random.default_rng(self.seed)
        if val is None:  # SentEval: a random `validation_split` of train is held out for early stopping
            perm = rng.permutation(len(X))
            n_dev = int(validation_split * len(X))
            val, X, y = (X[perm[:n_dev]], y[perm[:n_dev]]), X[perm[n_dev:]], y[perm[n_dev:]]
        self.classes_ = np.unique(np.concatenate([y, val[1]]))
        to_idx = {c: i for i, c in enumerate(self.classes_)}
        g = torch.Generator().manual_seed(self.seed)
        Xt = torch.as_tensor(X, dtype=torch.float32)
        yt = torch.as_tensor([to_idx[c] for c in y])
        model = torch.nn.Linear(X.shape[1], len(self.classes_))
        with torch.no_grad():  # a seeded init (nn.Linear's own draws from the global generator)
            bound = 1 / np.sqrt(X.shape[1])
            model.weight.uniform_(-bound, bound, generator=g)
            model.bias.uniform_(-bound, bound, generator=g)
        opt = torch.optim.Adam(model.parameters(), weight_decay=self.l2)
        best, best_acc, stale, epoch = copy.deepcopy(model), -1.0, 0, 0
        self.model = model
        while epoch <= self.max_epoch:
            for _ in range(self.epoch_size):
                for idx in torch.randperm(len(Xt), generator=g).split(self.batch_size):
                    loss = torch.nn.functional.cross_entropy(model(Xt[idx]), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            epoch += self.epoch_size
            acc = float((self.predict(val[0]) == val[1]).mean())
            if acc > best_acc:
                best, best_acc = copy.deepcopy(model), acc
            elif stale >= self.tenacity:
                break
            else:
                stale += 1
        self.model = best
        return self

    def predict(self, X) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.classes_[self.model(torch.as_tensor(X, dtype=torch.float32)).argmax(1).numpy()]


PYTORCH_SEQUENTIAL = Learner("pytorch-sequential", L2_GRID, lambda X, y, reg, val=None: TorchLogReg(reg).fit(X, y, val))
