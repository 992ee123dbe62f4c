"""Weighted k-NN evaluation of a backbone, following the official eval_knn.py.

    python -m dino_jax.eval.knn --checkpoint DIR --source fashion_mnist --eval_split test

Features: the CLS token of the (teacher) backbone on the evaluation transform,
L2-normalised. Classifier: for each test feature the k most similar train
features (cosine), each voting for its label with weight exp(sim / T); classes
ranked by summed votes; top-1 / top-5 in percent (T = 0.07, k = 10, 20, 100, 200).
The similarity search runs on device in chunks of the test set and of the
train bank with a running top-k merge, so a 1.28M x 384 bank never becomes a
full similarity matrix.
"""
from __future__ import annotations

import json
import math
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import sharding
from dino_jax.eval import base, common, features


# --------------------------------------------------------------------------
# Classifier.
# --------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("kmax", "train_chunk"))
def _topk_neighbours(test, bank, bank_valid, kmax: int, train_chunk: int):
    """(similarities (b, kmax) descending, bank indices (b, kmax)) by a running merge."""
    n_chunks = bank.shape[0] // train_chunk
    bank = bank.reshape(n_chunks, train_chunk, -1)
    valid = bank_valid.reshape(n_chunks, train_chunk)

    def body(carry, xs):
        best_s, best_i = carry
        chunk, ok, c = xs
        s = jnp.where(ok[None], test @ chunk.T, -jnp.inf)
        s_k, i_k = jax.lax.top_k(s, min(kmax, train_chunk))
        s_all = jnp.concatenate([best_s, s_k], axis=1)
        i_all = jnp.concatenate([best_i, i_k + c * train_chunk], axis=1)
        top_s, pos = jax.lax.top_k(s_all, kmax)
        return (top_s, jnp.take_along_axis(i_all, pos, axis=1)), None

    init = (jnp.full((test.shape[0], kmax), -jnp.inf, test.dtype),
            jnp.zeros((test.shape[0], kmax), jnp.int32))
    (s, i), _ = jax.lax.scan(body, init, (bank, valid, jnp.arange(n_chunks)))
    return s, i


@partial(jax.jit, static_argnames=("k", "num_classes"))
def _vote(sims, neighbour_labels, k: int, num_classes: int, temperature: float):
    """Class ranking (b, num_classes) from the first k neighbours' weighted votes."""
    w = jnp.exp(sims[:, :k] / temperature)
    one_hot = jax.nn.one_hot(neighbour_labels[:, :k], num_classes, dtype=w.dtype)
    probs = jnp.einsum("bk,bkc->bc", w, one_hot)
    return jnp.argsort(-probs, axis=1, stable=True)


def knn_classify(train_feats, train_labels, test_feats, test_labels, ks=(10, 20, 100, 200),
                 temperature: float = 0.07, num_classes: int | None = None, test_chunk: int = 1024,
                 train_chunk: int = 65536):
    """{k: (top1 %, top5 %)} of the official weighted k-NN. Features should be L2-normalised."""
    train_feats = np.asarray(train_feats, np.float32)
    test_feats = np.asarray(test_feats, np.float32)
    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    n_train = len(train_feats)
    num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
    ks = sorted({min(int(k), n_train) for k in ks})
    kmax = ks[-1]
    train_chunk = int(min(train_chunk, max(kmax, n_train)))
    n_pad = math.ceil(n_train / train_chunk) * train_chunk
    bank = np.zeros((n_pad, train_feats.shape[1]), np.float32)
    bank[:n_train] = train_feats
    valid = np.arange(n_pad) < n_train
    bank, valid = jnp.asarray(bank), jnp.asarray(valid)
    labels_dev = jnp.asarray(train_labels)
    correct = {k: [0, 0] for k in ks}
    for s in range(0, len(test_feats), test_chunk):
        t = jnp.asarray(test_feats[s:s + test_chunk])
        sims, idx = _topk_neighbours(t, bank, valid, kmax, train_chunk)
        nl = labels_dev[idx]
        target = test_labels[s:s + test_chunk, None]
        for k in ks:
            ranking = np.asarray(_vote(sims, nl, k, num_classes, float(temperature)))
            correct[k][0] += int((ranking[:, :1] == target).sum())
            correct[k][1] += int((ranking[:, :min(5, k)] == target).any(axis=1).sum())
    n = len(test_feats)
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}


def knn_evaluate(backbone, params, data_cfg, train_split="train", eval_split="test", k=20,
                 temperature=0.07, batch_size=256, mesh=None, max_train_examples=None,
                 max_eval_examples=None, ks=None, image_size=None, progress=None) -> dict:
    """Features of both splits with ``backbone``/``params``, then k-NN. Returns
    {'knn_top1', 'knn_top5'} for ``k`` and {'per_k': {k: (top1, top5)}} for ``ks``.
    With a mesh each host reads its shard of both splits; every host gets all features."""
    from dino_jax.data import pipeline  # noqa: PLC0415  (TensorFlow, only when k-NN runs)

    if mesh is not None:
        n_dev = mesh.devices.size
        batch_size = int(math.ceil(batch_size / n_dev) * n_dev)
    fn = features.feature_fn(backbone, "cls", normalize=True, mesh=mesh)
    per_host = batch_size // jax.process_count()
    tr = pipeline.create_eval_iterator(data_cfg, train_split, per_host, image_size,
                                       max_examples=max_train_examples)
    te = pipeline.create_eval_iterator(data_cfg, eval_split, per_host, image_size,
                                       max_examples=max_eval_examples)
    for it in (tr, te):
        pipeline.require_labels(it.source, "k-NN evaluation")
    train_f, train_l = common.iterator_features(fn, params, tr, mesh, progress)
    test_f, test_l = common.iterator_features(fn, params, te, mesh, progress)
    ks = sorted(set(ks or ()) | {int(k)})
    res = knn_classify(train_f, train_l, test_f, test_l, ks, temperature,
                       num_classes=max(tr.source.num_classes, int(train_l.max()) + 1))
    k_eff = min(int(k), len(train_f))
    return {"knn_top1": res[k_eff][0], "knn_top5": res[k_eff][1], "per_k": res,
            "num_train": len(train_f), "num_test": len(test_f)}


class KnnEvaluator(base.Evaluator):
    """The official weighted k-NN of the backbone's CLS features: ``knn_top1``/``knn_top5``
    (percent) for ``settings.k``, and ``knn_top1_k<K>``/``knn_top5_k<K>`` for each of ``ks``.

    ``settings``: the ``config.evals.knn`` block (every_epochs, train_split, eval_split, k,
    temperature, max_train_examples, max_eval_examples, batch_size); ``data_cfg``: the data
    config whose source both splits come from (and its evaluation transform)."""
    name = "knn"

    def __init__(self, settings, data_cfg, mesh=None, ks=(), progress=None):
        super().__init__(settings["every_epochs"])
        if not settings["eval_split"]:
            raise common.EvalError("k-NN needs a split to classify: set evals.knn.eval_split, or turn "
                                   "k-NN off with evals.knn.every_epochs=-1")
        self.settings, self.data_cfg, self.mesh = settings, data_cfg, mesh
        self.ks, self.progress = tuple(int(k) for k in ks), progress
        self.num_train = self.num_test = 0

    def run(self, backbone, params) -> dict:
        s = self.settings
        res = knn_evaluate(backbone, params, self.data_cfg, train_split=s["train_split"],
                           eval_split=s["eval_split"], k=int(s["k"]), temperature=float(s["temperature"]),
                           batch_size=int(s["batch_size"]), mesh=self.mesh,
                           max_train_examples=int(s["max_train_examples"]) or None,
                           max_eval_examples=int(s["max_eval_examples"]) or None, ks=self.ks,
                           progress=self.progress)
        self.num_train, self.num_test = res["num_train"], res["num_test"]
        out = {"knn_top1": float(res["knn_top1"]), "knn_top5": float(res["knn_top5"])}
        for kk in self.ks:
            t1, t5 = res["per_k"][min(kk, res["num_train"])]
            out[f"knn_top1_k{kk}"], out[f"knn_top5_k{kk}"] = float(t1), float(t5)
        return out


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = common.tool_parser("python -m dino_jax.eval.knn", __doc__)
    common.add_data_args(ap)
    ap.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200],
                    help="numbers of neighbours (official: 10 20 100 200)")
    ap.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim/T) (official 0.07)")
    ap.add_argument("--max_train_examples", type=int, default=0, help="use only the first N bank images (0: all)")
    ap.add_argument("--max_eval_examples", type=int, default=0, help="evaluate only the first N images (0: all)")
    a = ap.parse_args(argv)

    def body():
        model, params = common.load_backbone(a.checkpoint, a.dtype)
        settings = dict(every_epochs=0, train_split=a.train_split, eval_split=a.eval_split, k=a.nb_knn[0],
                        temperature=a.temperature, max_train_examples=a.max_train_examples,
                        max_eval_examples=a.max_eval_examples, batch_size=a.batch_size)
        ev = KnnEvaluator(settings, common.data_config_from_args(a), mesh=sharding.make_mesh(1), ks=a.nb_knn,
                          progress=lambda m: print(m, flush=True))
        res = ev.run(model, params)
        print(f"{ev.num_train} train / {ev.num_test} test images, T={a.temperature}")
        for k in a.nb_knn:
            print(f"{k}-NN classifier result: Top1: {res[f'knn_top1_k{k}']:.2f}, Top5: {res[f'knn_top5_k{k}']:.2f}")
        print(json.dumps({f"top1_k{k}": res[f"knn_top1_k{k}"] for k in a.nb_knn}
                         | {f"top5_k{k}": res[f"knn_top5_k{k}"] for k in a.nb_knn}))

    return common.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
