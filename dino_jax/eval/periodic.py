"""The evaluators of a training run, built from ``config.evals`` (big_vision style: the
protocol of :mod:`dino_jax.eval.base`, shared with the ``python -m dino_jax.eval.*``
programs).

    evaluators = periodic.build(config, mesh, progress)         # the blocks turned on
    numbers = periodic.run_due(evaluators, backbone, params, epochs_done, progress)
    summary = periodic.run_final(evaluators, backbone, params, baseline_params, ...)

``config.evals`` has one block per evaluator, each with ``every_epochs`` (-1 off, 0 at the
end of training only, N every N epochs and at the end) and its settings:

  knn                 weighted k-NN (``train_split`` bank, ``eval_split`` classified, ``k`` ...)
  linear              the linear probe (``train_split``, ``eval_split``, ``epochs`` ...)
  retrieval           revisited Oxford/Paris mAP
  copy_detection      Copydays mAP
  video_segmentation  DAVIS-2017 J&F by label propagation

The numbers are logged like the training metrics (the per-epoch ``log.txt`` line,
TensorBoard under ``eval/``, the progress stream).
"""
from __future__ import annotations

from dino_jax.config_defaults import check_renamed
from dino_jax.eval import base, copy_detection, knn, linear, retrieval, video_segmentation
from dino_jax.eval.common import EvalError  # noqa: F401  (callers catch it from here)

# Evaluators that are one function of (backbone, params, **settings).
FUNCTIONS = {"retrieval": retrieval.evaluate, "copy_detection": copy_detection.evaluate,
             "video_segmentation": video_segmentation.evaluate}
NAMES = ("knn", "linear", *FUNCTIONS)


def knn_enabled(config) -> bool:
    """Whether the run evaluates k-NN (then its splits need labels, checked at start-up)."""
    return int(config.evals.knn.every_epochs) >= 0


def wants_baseline(config) -> bool:
    """Whether the end of training also k-NNs the teacher the run started from."""
    return knn_enabled(config) and bool(config.evals.knn.random_init)


def build(config, mesh=None, progress=None) -> dict:
    """{name: evaluator} for every ``config.evals`` block turned on (``every_epochs >= 0``);
    an old flat field (``knn_k`` ...) or an unknown block is one clear error."""
    check_renamed(config)
    unknown = [n for n in config.evals if n not in NAMES]
    if unknown:
        raise EvalError(f"unknown evaluator {unknown[0]!r} in config.evals; known: {', '.join(NAMES)}")
    out = {}
    for name in NAMES:
        if name not in config.evals or int(config.evals[name].every_epochs) < 0:
            continue
        settings = config.evals[name]
        if name == "knn":
            out[name] = knn.KnnEvaluator(settings, config.data, mesh=mesh, progress=progress)
        elif name == "linear":
            out[name] = linear.LinearEvaluator(settings, config.data, mesh=mesh, progress=progress,
                                               seed=int(config.seed))
        else:
            kwargs = {k: v for k, v in settings.items() if k != "every_epochs"}
            out[name] = base.FunctionEvaluator(name, FUNCTIONS[name], kwargs, int(settings.every_epochs),
                                               progress)
    return out


run_due = base.run_due


def run_final(evaluators: dict, backbone, params, baseline_params=None, baseline_name: str = "random init",
              progress=None) -> dict:
    """Every evaluator at the end of training. k-NN's numbers are named
    ``knn_top1_trained``/``knn_top5_trained``, and with ``baseline_params`` (the teacher the
    run started from) ``knn_top1_random``/``knn_top5_random``: the gain the quickstart shows."""
    out = base.run_due(evaluators, backbone, params, None, progress)
    if "knn" not in evaluators:
        return out
    k = evaluators["knn"].settings["k"]
    for m in ("top1", "top5"):
        out[f"knn_{m}_trained"] = out.pop(f"knn_{m}")
    if progress:
        progress(f"k-NN (k={k}) top-1 of the trained teacher: {out['knn_top1_trained']:.2f}%")
    if baseline_params is not None:
        res0 = base.run_due({"knn": evaluators["knn"]}, backbone, baseline_params, None, progress)
        out["knn_top1_random"], out["knn_top5_random"] = res0["knn_top1"], res0["knn_top5"]
        if progress:
            progress(f"k-NN (k={k}) top-1 of the starting teacher ({baseline_name}): "
                     f"{out['knn_top1_random']:.2f}%")
    return out
