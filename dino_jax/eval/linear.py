"""Linear evaluation of a frozen backbone, following the official eval_linear.py.

    python -m dino_jax.eval.linear --checkpoint DIR --source image_folder --path /imagenet \\
        --train_split train --eval_split val --output_dir OUT [--n_last_blocks 4]
        [--avgpool_patchtokens false] [--epochs 100] [--batch_size 1024] [--lr 0.001]

Features: the CLS tokens of the last ``n_last_blocks`` blocks' outputs, each
passed through the final LayerNorm (``get_intermediate_layers``), concatenated;
with ``--avgpool_patchtokens true`` (``n_last_blocks`` 1) the mean of the last
block's patch tokens is added, interleaved with the CLS token exactly as the
official code lays it out, so its linear weights load unchanged. The paper uses
4 blocks without pooling for ViT-S and 1 block with pooling for ViT-B.
``--feature_layout dinov2`` gives DINOv2's evaluation features (dinov2/eval/linear.py):
the CLS tokens of the last ``n_last_blocks`` blocks, then with ``--avgpool_patchtokens
true`` the mean patch token of the last block appended after them, for any
``n_last_blocks``; register tokens are never pooled.

Classifier: one linear layer (weight normal(0, 0.01), bias 0) trained with
cross-entropy by SGD (momentum 0.9, weight decay 0 by default) at
``lr * batch / 256``, cosine-annealed to 0 once per epoch (torch's
CosineAnnealingLR stepped after each epoch). Training images get
RandomResizedCrop(image_size, scale 0.08-1) + horizontal flip, validation
images the evaluation transform (resize by ``resize_ratio``, centre crop); the
backbone is frozen and always in inference mode. The validation features are
computed once, since the backbone and their transform are fixed. Each epoch
drops its last partial batch.

Output (``--output_dir``): ``linear_weights.npz`` (``weight`` (num_labels, dim)
and ``bias``, the official ``nn.Linear`` layout), ``config.json`` (the options,
the backbone config, feature size and the final results), ``log.txt`` (one
JSON line per epoch) and ``checkpoint.npz`` (classifier, momentum, epoch),
from which an interrupted run resumes. ``--evaluate --linear_weights F``
evaluates saved weights (this tool's .npz or the official .pth).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax import paths, sharding
from dino_jax.eval import base, common, features
from dino_jax.models import vit

WEIGHTS = "linear_weights.npz"
CHECKPOINT = "checkpoint.npz"


# --------------------------------------------------------------------------
# Features and classifier.
# --------------------------------------------------------------------------
def feature_dim(model, n_last_blocks: int, avgpool: bool) -> int:
    return model.embed_dim * (n_last_blocks + int(avgpool))


def init_linear(key, dim: int, num_labels: int) -> dict:
    """The official LinearClassifier init: weight ~ N(0, 0.01), bias 0 (torch layout (out, in))."""
    return {"weight": 0.01 * jax.random.normal(key, (num_labels, dim), jnp.float32),
            "bias": jnp.zeros((num_labels,), jnp.float32)}


def apply_linear(lin, feats):
    return jnp.dot(feats, lin["weight"].T, precision=jax.lax.Precision.HIGHEST) + lin["bias"]


def make_optimizer(weight_decay: float = 0.0, momentum: float = 0.9):
    """torch.optim.SGD's direction (grad + wd * p, heavy-ball momentum, no dampening);
    the learning rate is applied by the step so it can change per epoch."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=False))


def epoch_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """CosineAnnealingLR(T_max=epochs, eta_min=0) after ``epoch`` scheduler steps."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def make_train_step(model, tx, n_last_blocks, avgpool, mesh, layout="dino"):
    def step(lin, opt_state, backbone, images, labels, lr):
        feats = jax.lax.stop_gradient(features.forward(model, backbone, images, "linear",
                                                       n_last_blocks=n_last_blocks, avgpool=avgpool,
                                                       layout=layout))

        def loss_fn(lin):
            logits = apply_linear(lin, feats)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(lin)
        updates, opt_state = tx.update(grads, opt_state, lin)
        lin = jax.tree.map(lambda p, u: p - lr * u, lin, updates)
        return lin, opt_state, loss

    rep, bat = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, rep, rep, bat, bat, None), out_shardings=(rep, rep, rep),
                   donate_argnums=(0, 1))


VAL_CHUNK = 8192  # validation rows scored per device call: bounds the logits' memory


class ValSet:
    """Validation features and labels on the device once, in padded chunks of ``VAL_CHUNK``
    rows (the last padded, masked), so each validation is a few device calls."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray):
        self.n = len(labels)
        self.max_label = int(labels.max()) if self.n else -1
        chunk = min(VAL_CHUNK, max(self.n, 1))
        n_pad = -(-max(self.n, 1) // chunk) * chunk
        f = np.zeros((n_pad, feats.shape[1]), np.float32)
        f[:self.n] = feats
        lab = np.zeros(n_pad, np.int32)
        lab[:self.n] = labels
        valid = np.arange(n_pad) < self.n
        self.chunks = [(jnp.asarray(f[i:i + chunk]), jnp.asarray(lab[i:i + chunk]), jnp.asarray(valid[i:i + chunk]))
                       for i in range(0, n_pad, chunk)]


@partial(jax.jit, static_argnames=("topk",))
def _val_sums(lin, feats, labels, valid, topk: int):
    """(top-1 hits, top-k hits, summed cross-entropy) over the valid rows, on the device."""
    logits = apply_linear(lin, feats)
    _, top = jax.lax.top_k(logits, topk)  # ties: the lower class first, as a stable sort
    hit = top == labels[:, None]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    return (jnp.sum(hit[:, 0] & valid), jnp.sum(hit.any(axis=1) & valid), jnp.sum(jnp.where(valid, nll, 0.0)))


def evaluate_linear(lin, val: ValSet) -> dict:
    """{'acc1', 'acc5' (when >= 5 classes), 'loss'} in percent, as the official utils.accuracy."""
    lin = jax.tree.map(jnp.asarray, lin)
    num_classes = int(lin["weight"].shape[0])
    topk = min(5, num_classes)
    sums = np.zeros(3, np.float64)
    for f, lab, ok in val.chunks:
        sums += np.asarray([float(x) for x in _val_sums(lin, f, lab, ok, topk)])
    n = max(val.n, 1)
    out = {"acc1": 100.0 * sums[0] / n}
    if num_classes >= 5:
        out["acc5"] = 100.0 * sums[1] / n
    out["loss"] = float(sums[2] / n)
    return out


def load_linear_weights(path: str) -> dict:
    """{'weight', 'bias'} from this tool's .npz or an official linear .pth
    (``state_dict`` with ``module.linear.weight``/``bias``)."""
    if not paths.exists(path):
        raise FileNotFoundError(f"no such linear weights file: {path}")
    if path.endswith(".npz"):
        with np.load(paths.readable(path), allow_pickle=False) as d:
            sd = {k: np.asarray(d[k]) for k in d.files}
    else:
        from dino_jax import torch_weights  # noqa: PLC0415

        try:
            raw = torch_weights.read_state_dict(path)
        except torch_weights.ConversionError as e:
            raise ValueError(str(e)) from e
        raw = raw.get("state_dict", raw)
        sd = {k.replace("module.", "").replace("linear.", ""): v for k, v in raw.items()}
    if "weight" not in sd or "bias" not in sd:
        raise ValueError(f"{path} holds no linear 'weight' and 'bias' (found: {', '.join(sorted(sd))})")
    return {"weight": np.asarray(sd["weight"], np.float32), "bias": np.asarray(sd["bias"], np.float32)}


# --------------------------------------------------------------------------
# The evaluation.
# --------------------------------------------------------------------------
def linear_evaluate(model, params, data_cfg, train_split="train", eval_split="test", n_last_blocks=4,
                    avgpool=False, epochs=100, batch_size=1024, lr=0.001, weight_decay=0.0,
                    num_labels=None, seed=0, image_size=None, val_freq=1, output_dir=None,
                    max_eval_examples=None, evaluate_weights=None, resume=True, progress=print,
                    log_every=20, mesh=None, feature_layout="dino") -> dict:
    """Train (or with ``evaluate_weights`` only evaluate) the linear probe; returns
    {'acc1', 'acc5', 'best_acc1', 'linear': {'weight', 'bias'}, 'epochs_run', ...}.
    The training source is built once and re-shuffled per epoch; the validation features
    are computed once and scored on the device."""
    from dino_jax.data import pipeline  # noqa: PLC0415  (TensorFlow, only when the probe runs)

    progress = progress or (lambda _m: None)
    if n_last_blocks < 1 or n_last_blocks > model.depth:
        raise ValueError(f"--n_last_blocks must be in 1..{model.depth} (the backbone's depth), got {n_last_blocks}")
    if feature_layout not in features.LINEAR_LAYOUTS:
        raise ValueError(f"--feature_layout must be one of {features.LINEAR_LAYOUTS}, got {feature_layout!r}")
    if avgpool and n_last_blocks != 1 and feature_layout == "dino":
        raise ValueError("--avgpool_patchtokens true needs --n_last_blocks 1 (the official layout "
                         "interleaves one CLS token with the pooled patch token; --feature_layout dinov2 pools after "
                         "any number)")
    if epochs < 1 and evaluate_weights is None:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    mesh = mesh or sharding.make_mesh(1)
    sharding.check_batch_size(batch_size, mesh)
    per_host = batch_size // jax.process_count()
    dim = feature_dim(model, n_last_blocks, avgpool)
    train_it = None
    if evaluate_weights is None:
        train_it = pipeline.create_supervised_train_iterator(data_cfg, train_split, batch_size, seed, image_size)
    train_classes = train_it.source.num_classes if train_it is not None else 0
    val_iter = pipeline.create_eval_iterator(data_cfg, eval_split, per_host, image_size,
                                             max_examples=max_eval_examples)
    num_labels = int(num_labels or max(train_classes, val_iter.source.num_classes))

    progress(f"features of {val_iter.num_examples} {eval_split} images "
             f"({n_last_blocks} block(s){' + avgpool' if avgpool else ''}, dim {dim})")
    feat_fn = features.feature_fn(model, "linear", mesh=mesh, n_last_blocks=n_last_blocks, avgpool=avgpool,
                                  layout=feature_layout)
    val_feats, val_labels = common.iterator_features(feat_fn, params, val_iter, mesh, progress)
    val = ValSet(val_feats, val_labels)
    if evaluate_weights is None and len(val_labels) and val_labels.max() >= num_labels:
        raise ValueError(f"{eval_split} has label {int(val_labels.max())} but the classifier has "
                         f"{num_labels} outputs (--num_labels)")

    if evaluate_weights is not None:
        lin = evaluate_weights
        if lin["weight"].ndim != 2 or lin["weight"].shape[1] != dim or lin["bias"].shape != lin["weight"].shape[:1]:
            raise ValueError(f"linear weights of shape {lin['weight'].shape} do not fit features of dim {dim} "
                             f"(check --n_last_blocks / --avgpool_patchtokens)")
        if len(val_labels) and val_labels.max() >= lin["weight"].shape[0]:
            raise ValueError(f"{eval_split} has label {int(val_labels.max())} but the classifier has "
                             f"{lin['weight'].shape[0]} outputs")
        stats = evaluate_linear(lin, val)
        return {**stats, "best_acc1": stats["acc1"], "linear": lin, "epochs_run": 0,
                "num_labels": int(lin["weight"].shape[0]), "dim": dim, "num_val": len(val_labels)}

    tx = make_optimizer(weight_decay)
    base_lr = lr * batch_size / 256.0  # linear scaling rule
    lin = init_linear(jax.random.key(seed), dim, num_labels)
    opt_state = tx.init(lin)
    start_epoch, best_acc, history = 0, 0.0, []
    ckpt_path = paths.join(output_dir, CHECKPOINT) if output_dir else None
    if resume and ckpt_path and paths.exists(ckpt_path):
        lin, opt_state, start_epoch, best_acc = _restore(ckpt_path, lin, opt_state)
        progress(f"resumed from {ckpt_path} at epoch {start_epoch} (best top-1 so far {best_acc:.2f})")
        if start_epoch:  # the same batches as an uninterrupted run from here on
            train_it = pipeline.create_supervised_train_iterator(
                data_cfg, train_split, batch_size, seed, image_size,
                start_step=start_epoch * train_it.steps_per_epoch)
    rep = sharding.replicated(mesh)
    lin, opt_state, backbone = jax.device_put((lin, opt_state, params), rep)
    step = make_train_step(model, tx, n_last_blocks, avgpool, mesh, feature_layout)
    bsh = sharding.batch_sharding(mesh)
    stats = {}
    for epoch in range(start_epoch, epochs):
        e_lr = epoch_lr(base_lr, epoch, epochs)
        n_steps = train_it.steps_per_epoch
        losses, t0 = [], time.time()
        for i in range(n_steps):
            batch = next(train_it)
            images = jax.make_array_from_process_local_data(bsh, batch["image"])
            labels = jax.make_array_from_process_local_data(bsh, batch["label"])
            lin, opt_state, loss = step(lin, opt_state, backbone, images, labels, jnp.float32(e_lr))
            losses.append(loss)
            if progress and log_every and ((i + 1) % log_every == 0 or i + 1 == n_steps):
                progress(f"Epoch: [{epoch}] [{i + 1}/{n_steps}] loss {float(loss):.4f} lr {e_lr:.6f} "
                         f"({time.time() - t0:.0f}s)")
        log = {"train_loss": float(np.mean([float(x) for x in losses])), "train_lr": e_lr, "epoch": epoch}
        if epoch % val_freq == 0 or epoch == epochs - 1:
            stats = evaluate_linear(jax.device_get(lin), val)  # host copy: several processes hold lin
            best_acc = max(best_acc, stats["acc1"])
            progress(f"Accuracy at epoch {epoch} of the network on the {len(val_labels)} test images: "
                     f"{stats['acc1']:.1f}% (top-5 {stats.get('acc5', float('nan')):.1f}%, "
                     f"best top-1 {best_acc:.2f}%)")
            log.update({f"test_{k}": v for k, v in stats.items()})
        history.append(log)
        if output_dir and jax.process_index() == 0:
            paths.append_text(paths.join(output_dir, "log.txt"), json.dumps(log) + "\n")
            _save(ckpt_path, jax.device_get(lin), jax.device_get(opt_state), epoch + 1, best_acc)
    lin = jax.tree.map(np.asarray, jax.device_get(lin))
    if not stats:  # resumed after the last epoch
        stats = evaluate_linear(lin, val)
        best_acc = max(best_acc, stats["acc1"])
    return {**stats, "best_acc1": best_acc, "linear": lin, "epochs_run": len(history), "history": history,
            "num_labels": num_labels, "dim": dim, "num_val": len(val_labels)}


class LinearEvaluator(base.Evaluator):
    """The linear probe as an evaluator: ``linear_top1``/``linear_top5`` (percent, the last
    epoch's validation) and ``linear_best_top1``. ``settings``: the ``config.evals.linear``
    block (every_epochs, train_split, eval_split, n_last_blocks, avgpool, feature_layout, epochs,
    batch_size, lr, weight_decay, max_eval_examples); ``options``: the program's extra keyword arguments
    of :func:`linear_evaluate` (output_dir, evaluate_weights, num_labels, val_freq, ...).
    ``last`` holds the whole result of the last run (the classifier included)."""
    name = "linear"

    def __init__(self, settings, data_cfg, mesh=None, progress=None, seed: int = 0, **options):
        super().__init__(settings["every_epochs"])
        self.settings, self.data_cfg, self.mesh, self.progress = settings, data_cfg, mesh, progress
        self.seed, self.options, self.last = int(seed), options, None

    def run(self, backbone, params) -> dict:
        s = self.settings
        self.last = res = linear_evaluate(
            backbone, params, self.data_cfg, s["train_split"], s["eval_split"], int(s["n_last_blocks"]),
            bool(s["avgpool"]), int(s["epochs"]), int(s["batch_size"]), float(s["lr"]), float(s["weight_decay"]),
            seed=self.seed, max_eval_examples=int(s["max_eval_examples"]) or None, progress=self.progress,
            mesh=self.mesh, feature_layout=str(s["feature_layout"]), **self.options)
        out = {"linear_top1": float(res["acc1"]), "linear_best_top1": float(res["best_acc1"])}
        if "acc5" in res:
            out["linear_top5"] = float(res["acc5"])
        return out


def _save(path, lin, opt_state, epoch, best_acc):
    trace = opt_state[1].trace
    common.save_npz(path, {"weight": np.asarray(lin["weight"]), "bias": np.asarray(lin["bias"]),
                    "momentum/weight": np.asarray(trace["weight"]), "momentum/bias": np.asarray(trace["bias"]),
                    "epoch": np.int64(epoch), "best_acc": np.float64(best_acc)})


def _restore(path, lin, opt_state):
    with np.load(paths.readable(path), allow_pickle=False) as d:
        got = {k: np.asarray(d[k]) for k in d.files}
    if got["weight"].shape != lin["weight"].shape:
        raise ValueError(f"{path} holds a classifier of shape {got['weight'].shape}, this run needs "
                         f"{tuple(lin['weight'].shape)}: use another --output_dir or --no_resume")
    new_lin = {"weight": jnp.asarray(got["weight"]), "bias": jnp.asarray(got["bias"])}
    trace = {"weight": jnp.asarray(got["momentum/weight"]), "bias": jnp.asarray(got["momentum/bias"])}
    opt_state = (opt_state[0], opt_state[1]._replace(trace=trace))
    return new_lin, opt_state, int(got["epoch"]), float(got["best_acc"])


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------
def _bool_flag(s: str) -> bool:
    v = s.lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = common.tool_parser("python -m dino_jax.eval.linear", __doc__, dtype=False)
    common.add_data_args(ap, batch_size=1024,
                         batch_help="global batch of the linear training (official: 128 per GPU x 8 = 1024); "
                                    "the learning rate is scaled by batch/256")
    ap.add_argument("--n_last_blocks", type=int, default=4,
                    help="concatenate the CLS tokens of the last n blocks (official: 4 for ViT-S, 1 for ViT-B)")
    ap.add_argument("--avgpool_patchtokens", type=_bool_flag, default=False,
                    help="also concatenate the mean patch token of the last block (official: false for "
                         "ViT-S, true for ViT-B with --n_last_blocks 1)")
    ap.add_argument("--feature_layout", default="dino", choices=("dino", "dinov2"),
                    help="dino: the official DINO layout (pooled token interleaved, n_last_blocks 1); "
                         "dinov2: DINOv2's evaluation features, the CLS tokens of the last n blocks then "
                         "the last block's mean patch token (any n_last_blocks)")
    ap.add_argument("--epochs", type=int, default=100, help="training epochs (official 100)")
    ap.add_argument("--lr", type=float, default=0.001,
                    help="learning rate for a batch of 256 (scaled by batch/256), cosine-annealed to 0 "
                         "over the epochs; official 0.001, worth tuning per checkpoint")
    ap.add_argument("--weight_decay", type=float, default=0.0, help="SGD weight decay (official: 0)")
    ap.add_argument("--num_labels", type=int, default=0,
                    help="classifier outputs (0: the number of classes of the training split)")
    ap.add_argument("--val_freq", type=int, default=1, help="validate every N epochs (and after the last)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the classifier init and the augmentation")
    ap.add_argument("--max_eval_examples", type=int, default=0,
                    help="validate on the first N images only (0: all)")
    ap.add_argument("--output_dir", default=".",
                    help="where linear_weights.npz, config.json, log.txt and checkpoint.npz go")
    ap.add_argument("--no_resume", action="store_true",
                    help="start afresh even when --output_dir holds a checkpoint.npz of an earlier run")
    ap.add_argument("--evaluate", action="store_true",
                    help="only evaluate the classifier given by --linear_weights")
    ap.add_argument("--linear_weights", default="",
                    help="with --evaluate: linear_weights.npz of this tool or an official linear .pth")
    ap.add_argument("--log_every", type=int, default=20, help="print a progress line every N steps")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="backbone compute dtype (the classifier always trains in float32)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def say(m):
        print(m, flush=True)

    def body():
        if a.evaluate and not a.linear_weights:
            raise common.EvalError("--evaluate needs --linear_weights")
        if a.val_freq < 1:
            raise common.EvalError(f"--val_freq must be at least 1, got {a.val_freq}")
        model, params = common.load_backbone(a.checkpoint, a.dtype)
        weights = load_linear_weights(a.linear_weights) if a.evaluate else None
        paths.makedirs(a.output_dir)
        settings = dict(every_epochs=0, train_split=a.train_split, eval_split=a.eval_split,
                        n_last_blocks=a.n_last_blocks, avgpool=a.avgpool_patchtokens, epochs=a.epochs,
                        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                        max_eval_examples=a.max_eval_examples, feature_layout=a.feature_layout)
        ev = LinearEvaluator(settings, common.data_config_from_args(a), progress=say, seed=a.seed,
                             num_labels=a.num_labels or None, image_size=a.image_size, val_freq=a.val_freq,
                             output_dir=a.output_dir, evaluate_weights=weights, resume=not a.no_resume,
                             log_every=a.log_every)
        ev.run(model, params)
        res = ev.last
        results = {k: res[k] for k in ("acc1", "acc5", "loss", "best_acc1") if k in res}
        if jax.process_index() == 0 and not a.evaluate:
            common.save_npz(paths.join(a.output_dir, WEIGHTS), res["linear"])
            cfg = {k: v for k, v in vars(a).items()} | {
                "model": vit.model_config(model), "feature_dim": res["dim"], "num_labels": res["num_labels"],
                "results": results, "num_val": res["num_val"]}
            paths.write_text(paths.join(a.output_dir, "config.json"), json.dumps(cfg, indent=1, sort_keys=True))
            say(f"wrote {paths.join(a.output_dir, WEIGHTS)} and config.json")
        top5 = f", Top5: {res['acc5']:.2f}" if "acc5" in res else ""
        say(f"Linear classifier result on {res['num_val']} images: Top1: {res['acc1']:.2f}{top5} "
            f"(best top-1 {res['best_acc1']:.2f})")
        say(json.dumps(results))

    return common.run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
