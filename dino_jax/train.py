"""TrainState and the DINO train step: one official training iteration as a pure,
jitted, sharded JAX function.

One step (official main_dino.train_one_epoch, in this order):
  1. teacher forward on the 2 global crops (no drop path);
  2. student forward on all crops: the backbone once per distinct resolution,
     the head once on the concatenation of all CLS features;
  3. DINO loss (centering + sharpening of the teacher, stop-gradient);
  4. gradients; each tensor clipped to ``clip_grad`` on its own; the last layer
     skipped entirely while frozen; AdamW (PyTorch semantics);
  5. teacher <- m teacher + (1 - m) student over every parameter;
  6. center <- 0.9 center + 0.1 mean(global-batch teacher outputs of this step).

Layout: the pipeline's batch is ``{'global_crops': (B, 2, H, W, 3),
'local_crops': (B, L, h, w, 3)}`` split over devices along B. The step keeps the
crops batch-major inside each resolution (``(B, n) -> (B*n)``, which keeps every
device's rows local) and moves the crop axis first only for the loss, which
sees ``(ncrops, B, K)``: the same pairs, the same means as the official
crop-major ``chunk`` (the models treat rows independently).

Per-iteration hyper-parameters (lr, weight decay, teacher momentum, teacher
temperature, last-layer freeze) come from ``schedules.build_schedules`` as
device arrays passed to the step and indexed with ``state.step`` on device.
"""
from __future__ import annotations

import functools
import logging
import platform as host
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax import ema, losses, optim, schedules, sharding
from dino_jax.data import device_augment
from dino_jax.models import vit
from dino_jax.models.head import DINOHead

PyTree = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue (all of it is saved in checkpoints).

    step: int32 scalar, iterations done (indexes the schedules).
    student, teacher: params ``{'backbone': ..., 'head': ...}`` (float32).
    center: (1, K) float32, the DINO center.
    opt_state: :func:`optim.dino_optimizer` state (per-parameter step counts,
      both Adam moments).
    rng: uint32[2] base PRNG key; step i uses ``fold_in(rng, i)`` (drop path),
      so a resumed run draws the same numbers.
    """
    step: jax.Array
    student: PyTree
    teacher: PyTree
    center: jax.Array
    opt_state: PyTree
    rng: jax.Array


# --------------------------------------------------------------------------
# Models and optimiser from the config.
# --------------------------------------------------------------------------
def compute_dtype(config) -> Any:
    """``config.model.dtype`` as a jnp dtype; 'auto' is bfloat16 on GPU and TPU, float32 on CPU."""
    name = str(config.model.dtype)
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES) + ['auto']}, got {name!r}")
    return _DTYPES[name]


def build_models(config) -> tuple[vit.VisionTransformer, DINOHead]:
    """(backbone, head) from ``config.model``. The backbone carries the student's
    drop-path rate; the teacher runs the same module with ``train=False``."""
    m = config.model
    fields = ("arch", "patch_size", "img_size", "fused_attention", "remat", "platform_ops",
              # DINOv2 backbones (DINO's ViT at their defaults)
              "num_register_tokens", "layerscale_init", "ffn", "interpolate_offset",
              "interpolate_antialias", "mask_token")
    if m.arch == "custom":  # otherwise the official dims of the arch win over these fields
        fields += ("embed_dim", "depth", "num_heads")
    cfg = {k: m[k] for k in fields}
    dtype = compute_dtype(config)
    backbone = vit.build_backbone(cfg, drop_path_rate=float(m.drop_path_rate), dtype=dtype)
    head = DINOHead(out_dim=int(m.out_dim), norm_last_layer=bool(m.norm_last_layer),
                    nlayers=int(m.head_nlayers), hidden_dim=int(m.head_hidden_dim),
                    bottleneck_dim=int(m.head_bottleneck_dim), dtype=dtype,
                    platform_ops=str(m.platform_ops))
    return backbone, head


def make_optimizer(config) -> optax.GradientTransformationExtraArgs:
    """Per-tensor clip + PyTorch AdamW with the official masks (lr and weight decay
    are given per step by the train step)."""
    return optim.dino_optimizer(
        clip_grad=float(config.clip_grad), b1=float(config.adam_b1), b2=float(config.adam_b2),
        eps=float(config.adam_eps),
        norm_last_layer=bool(config.model.norm_last_layer))


# --------------------------------------------------------------------------
# State creation.
# --------------------------------------------------------------------------
def train_state_from_params(student: PyTree, out_dim: int, optimizer, rng) -> TrainState:
    """A fresh TrainState from given student params: teacher = copy of the
    student (as officially), center 0, optimiser at step 0."""
    student = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), student)
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32), student=student,
        teacher=ema.teacher_ema().init(student),
        center=ema.center_ema(out_dim).init(), opt_state=optimizer.init(student),
        rng=rng.astype(jnp.uint32))


def init_student_params(backbone, head, rng) -> PyTree:
    """Student params with the model init distributions."""
    k_b, k_h = jax.random.split(rng)
    x = jnp.zeros((1, backbone.img_size, backbone.img_size, backbone.in_chans), jnp.float32)
    bparams = backbone.init({"params": k_b}, x)["params"]
    hparams = head.init({"params": k_h}, jnp.zeros((1, backbone.embed_dim), jnp.float32))["params"]
    return {"backbone": bparams, "head": hparams}


def state_shardings(state_shape: TrainState, mesh, num_fsdp: int | None = None,
                    min_fsdp_size: int = sharding.MIN_FSDP_SIZE) -> TrainState:
    """Shardings of every TrainState leaf: replicated, or fsdp-split when the mesh's
    'fsdp' axis is > 1 (large tensors only; see sharding.fsdp_spec)."""
    fsdp = (num_fsdp if num_fsdp is not None else mesh.shape[sharding.FSDP_AXIS]) > 1
    return sharding.tree_shardings(state_shape, mesh, fsdp=fsdp, min_size=min_fsdp_size)


def create_train_state(config, rng=None, mesh=None, models=None, optimizer=None,
                       min_fsdp_size: int = sharding.MIN_FSDP_SIZE) -> TrainState:
    """Initialise the student with the model init distributions, teacher = student.

    rng: PRNG key (default ``PRNGKey(config.seed)``). With ``mesh`` the state is
    created directly in its shardings (replicated, or fsdp-split over
    ``mesh.shape['fsdp']``), so a large model is never materialised on one device.
    """
    backbone, head = models if models is not None else build_models(config)
    optimizer = optimizer if optimizer is not None else make_optimizer(config)
    if rng is None:
        rng = jax.random.PRNGKey(int(config.seed))
    init_key, step_key = jax.random.split(rng)

    def init(k_init, k_step):
        return train_state_from_params(init_student_params(backbone, head, k_init),
                                       head.out_dim, optimizer, k_step)

    if mesh is None:
        return jax.jit(init)(init_key, step_key)
    shape = jax.eval_shape(init, init_key, step_key)
    out_sh = state_shardings(shape, mesh, min_fsdp_size=min_fsdp_size)
    return jax.jit(init, out_shardings=out_sh)(init_key, step_key)


# --------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------
def _crop_groups(batch) -> list[jax.Array]:
    """Crop arrays (B, n, H, W, C) grouped by resolution, global first; groups of
    equal resolution are merged (the official wrapper groups consecutive equal
    widths)."""
    groups = [batch["global_crops"]]
    local = batch.get("local_crops")
    if local is not None and local.shape[1] > 0:
        if local.shape[2:] == groups[0].shape[2:]:
            groups = [jnp.concatenate([groups[0], local], axis=1)]
        else:
            groups.append(local)
    return groups


def make_train_step_fn(config, models=None, optimizer=None, batch_sharding=None) -> Callable:
    """The pure (un-jitted) step ``(state, batch, schedule) -> (state, metrics)``.

    ``schedule``: dict of per-iteration arrays (``schedules.device_schedules``);
    this step reads entry ``state.step``. ``batch_sharding``: optional sharding
    of the flattened crops (keeps activations split over the batch).

    Metrics (float32 scalars, replicated): ``loss``; the collapse diagnostics of
    ``losses.dino_loss`` (``teacher_entropy``, ``batch_entropy``, ``kl``,
    ``teacher_max_prob``) and ``collapse`` (1.0 when ``losses.collapse_flag``
    holds); the step's ``lr``, ``wd``, ``momentum``, ``teacher_temp``,
    ``last_layer_frozen``; ``grad_norm`` (global L2 norm of the trainable
    gradients before clipping); ``nonfinite`` (1.0 when the loss or a gradient
    is NaN/inf; this pure step updates the state regardless: :class:`TrainStep`
    guards it).
    """
    backbone, head = models if models is not None else build_models(config)
    optimizer = optimizer if optimizer is not None else make_optimizer(config)
    student_temp = float(config.student_temp)
    center_tf = ema.center_ema(head.out_dim, float(config.center_momentum))
    teacher_tf = ema.teacher_ema()
    out_dim = head.out_dim

    def constrain(x):
        if batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding)

    def flatten(x):  # (B, n, H, W, C) -> (B*n, H, W, C), batch-major
        return constrain(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]))

    def train_step(state: TrainState, batch, schedule):
        if "global_aug" in batch:  # data.device_augment: uint8 crops + decisions -> float crops
            batch = device_augment.apply(config, batch)
        i = state.step
        at = lambda name: jnp.take(jnp.asarray(schedule[name]), i, mode="clip")  # noqa: E731
        lr, wd, momentum = at("lr"), at("weight_decay"), at("momentum")
        teacher_temp, frozen = at("teacher_temp"), at("last_layer_frozen")
        step_rng = jax.random.fold_in(state.rng, i)

        groups = _crop_groups(batch)
        b = groups[0].shape[0]
        n_global = batch["global_crops"].shape[1]
        if n_global != 2:
            raise ValueError(f"DINO uses 2 global crops, got {n_global}")

        # 1. teacher on the 2 global crops (eval mode).
        t_feat = backbone.apply({"params": state.teacher["backbone"]},
                                flatten(batch["global_crops"]), train=False)
        t_out = head.apply({"params": state.teacher["head"]}, t_feat)
        t_out = jax.lax.stop_gradient(t_out.astype(jnp.float32)).reshape(b, 2, out_dim)
        t_out = jnp.swapaxes(t_out, 0, 1)                                  # (2, B, K)

        # 2.-3. student on all crops + loss.
        def loss_fn(student):
            feats = []
            for g, crops in enumerate(groups):
                f = backbone.apply({"params": student["backbone"]}, flatten(crops), train=True,
                                   rngs={"drop_path": jax.random.fold_in(step_rng, g)})
                feats.append(f.reshape(b, crops.shape[1], -1))
            feats = jnp.concatenate(feats, axis=1)                         # (B, ncrops, D)
            ncrops = feats.shape[1]
            s_out = head.apply({"params": student["head"]},
                               constrain(feats.reshape(b * ncrops, -1)))
            s_out = jnp.swapaxes(s_out.astype(jnp.float32).reshape(b, ncrops, out_dim), 0, 1)
            return losses.dino_loss(s_out, t_out, state.center, teacher_temp, student_temp)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)

        # 4. clip, last-layer freeze, AdamW.
        trainable = optim.trainable_mask(state.student, head.norm_last_layer)
        grad_norm = optax.tree.norm(
            [g for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t])
        active = optim.active_mask(optim.last_layer_mask(state.student), frozen)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.student,
                                              learning_rate=lr, weight_decay=wd, active=active)
        student = optax.apply_updates(state.student, updates)

        # 5.-6. teacher EMA and center.
        teacher = teacher_tf.update(student, state.teacher, momentum)
        center = center_tf.update(t_out, state.center)

        metrics = {
            "loss": loss, **aux,
            "collapse": losses.collapse_flag(aux, out_dim).astype(jnp.float32),
            "lr": lr, "wd": wd, "momentum": momentum, "teacher_temp": teacher_temp,
            "last_layer_frozen": frozen.astype(jnp.float32),
            "grad_norm": grad_norm,
            "nonfinite": jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32),
        }
        new_state = state.replace(step=i + 1, student=student, teacher=teacher, center=center,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step


# Per-step metrics of :func:`make_train_step_fn` (the accumulator's layout).
METRIC_NAMES = ("loss", "teacher_entropy", "batch_entropy", "kl", "teacher_max_prob", "collapse", "lr",
                "wd", "momentum", "teacher_temp", "last_layer_frozen", "grad_norm", "nonfinite")


def new_metrics_accumulator() -> dict:
    """Zeros of the metrics accumulator that :class:`TrainStep` carries from step to
    step on the devices (host numpy here; ``TrainStep.new_accumulator`` puts it there):

    sums, count: per-metric sums over the applied (finite) steps and their number;
    last: the metrics of the last applied step; first_bad: 1-based number of the
    first step with a non-finite loss or gradient since the accumulator was made
    (0: none), bad_loss: its loss; skipped: steps whose update was not applied.
    """
    zero = np.zeros((), np.float32)
    return {"sums": {k: zero for k in METRIC_NAMES}, "last": {k: zero for k in METRIC_NAMES},
            "count": np.zeros((), np.int32), "first_bad": np.zeros((), np.int32),
            "bad_loss": zero, "skipped": np.zeros((), np.int32)}


def _guarded(step_fn, halt_on_nonfinite: bool) -> Callable:
    """``(state, batch, schedule, acc) -> (state, metrics, acc)``: ``step_fn`` whose
    update is applied only when its loss and gradients are finite, with the metrics
    added to the accumulator ``acc`` on device (see :func:`new_metrics_accumulator`).

    halt_on_nonfinite: after the first non-finite step no later step (with the same
    accumulator) is applied either, so the state stays the last good one (step
    number included) until the loop reads the accumulator and stops. Otherwise a
    non-finite step is skipped (its update dropped, the step counter advanced) and
    training goes on.
    """
    def guarded(state, batch, schedule, acc):
        new_state, metrics = step_fn(state, batch, schedule)
        if set(metrics) != set(METRIC_NAMES):
            raise ValueError(f"train step metrics {sorted(metrics)} != train.METRIC_NAMES")
        bad = metrics["nonfinite"] > 0
        halted = (acc["first_bad"] > 0) if halt_on_nonfinite else jnp.zeros((), bool)
        apply = jnp.logical_not(bad | halted)
        out = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new_state, state)
        if not halt_on_nonfinite:
            out = out.replace(step=new_state.step)
        first = (acc["first_bad"] == 0) & bad & jnp.logical_not(halted)
        acc = {"sums": {k: acc["sums"][k] + jnp.where(apply, metrics[k], 0.0) for k in METRIC_NAMES},
               "last": {k: jnp.where(apply, metrics[k], acc["last"][k]) for k in METRIC_NAMES},
               "count": acc["count"] + apply.astype(jnp.int32),
               "first_bad": jnp.where(first, state.step + 1, acc["first_bad"]).astype(jnp.int32),
               "bad_loss": jnp.where(first, metrics["loss"], acc["bad_loss"]),
               "skipped": acc["skipped"] + jnp.logical_not(apply).astype(jnp.int32)}
        return out, metrics, acc

    return guarded


# Which of the step's work XLA:CPU hands to YNNPACK (x86-64): the reductions only
# (LayerNorm statistics, softmax sums, bias gradients). XLA's default also gives it
# the matmuls, fused with the elementwise work around them, and those fusions run
# slower than XLA's own matmul thunks with separate loop fusions
# (benchmarks/README.md). Dropped, with one warning, where this jaxlib does not
# accept it (the option is experimental).
CPU_STEP_LIBRARY_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_library_options() -> tuple:
    """``CPU_STEP_LIBRARY_OPTIONS`` as (key, value) pairs where this host and jaxlib
    take them (x86-64, the option known: one tiny compile per process), else ()."""
    if host.machine().lower() not in ("x86_64", "amd64"):
        return ()
    try:
        x = jax.device_put(np.ones((2, 2), np.float32), jax.devices("cpu")[0])
        jax.jit(lambda a: a @ a, compiler_options=CPU_STEP_LIBRARY_OPTIONS).lower(x).compile()
    except Exception as e:  # an unknown option or enum value in another jaxlib
        logging.warning("XLA:CPU library options %s not accepted by this jaxlib (%s); "
                        "the train step uses XLA's defaults", sorted(CPU_STEP_LIBRARY_OPTIONS),
                        (str(e).splitlines() or [type(e).__name__])[0][:200])
        return ()
    return tuple(CPU_STEP_LIBRARY_OPTIONS.items())


def step_compiler_options(platform: str) -> dict | None:
    """XLA compiler options of the train step on ``platform`` (None: XLA's defaults)."""
    if platform != "cpu":
        return None
    return dict(_cpu_library_options()) or None


class TrainStep:
    """The jitted DINO train step with its non-finite guard: the one step program
    that the trainer, the tests and the benchmarks run.

        step = TrainStep(config, schedules.build_schedules(config, steps_per_epoch), mesh=mesh,
                         state_sharding=state_shardings(...))
        acc = step.new_accumulator()
        state, metrics, acc = step(state, batch, acc)    # metrics: this step's; acc: the running sums

    Without ``mesh``: plain ``jax.jit``. With ``mesh``: explicit shardings, the
    batch split over every device (``sharding.batch_sharding``), the state as
    ``state_sharding`` (default: replicated; pass ``state_shardings(...)`` of an
    fsdp mesh for fsdp), metrics, accumulator and schedule replicated. The state
    buffers are donated (``donate=False`` keeps them). A step whose loss or
    gradient is NaN/inf returns the state it was given (see :func:`_guarded` for
    ``halt_on_nonfinite``). The accumulator (:func:`new_metrics_accumulator`)
    stays on the devices, so a loop that reads it only at its sync points makes
    no other device-to-host transfer.

    ``schedule``: the per-iteration host arrays of ``schedules.build_schedules``,
    put on the devices once and indexed with ``state.step`` on device; or
    ``jax.ShapeDtypeStruct``s of them, for lowering alone (e.g. on a TPU
    topology's abstract devices). ``lower(state, batch)`` lowers the program
    ``(state, batch, schedule, acc) -> (state, metrics, acc)`` for cost analysis
    or ahead-of-time compilation (arrays or ``jax.ShapeDtypeStruct``s); its
    compiled form is called with ``step.schedule``. A batch the mesh can't split
    raises one clear ValueError before tracing.
    """

    def __init__(self, config, schedule: dict, mesh=None, state_sharding: TrainState | None = None,
                 models=None, optimizer=None, donate: bool = True, halt_on_nonfinite: bool = True):
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        options = step_compiler_options(platform)
        donate_argnums = (0,) if donate else ()
        self._mesh = mesh
        if mesh is None:
            fn = _guarded(make_train_step_fn(config, models, optimizer), halt_on_nonfinite)
            self._jitted = jax.jit(fn, donate_argnums=donate_argnums, compiler_options=options)
            self._replicated = None
        else:
            bsh = sharding.batch_sharding(mesh)
            repl = self._replicated = sharding.replicated(mesh)
            fn = _guarded(make_train_step_fn(config, models, optimizer, batch_sharding=bsh), halt_on_nonfinite)
            st_sh = state_sharding if state_sharding is not None else repl
            self._jitted = jax.jit(fn, in_shardings=(st_sh, bsh, repl, repl), out_shardings=(st_sh, repl, repl),
                                   donate_argnums=donate_argnums, compiler_options=options)
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(schedule))
        self.schedule = schedule if abstract else self._put(schedules.device_schedules(schedule))

    def _put(self, tree):
        return jax.device_put(tree, self._replicated) if self._replicated is not None else jax.device_put(tree)

    def new_accumulator(self) -> dict:
        """Zeros of the metrics accumulator (:func:`new_metrics_accumulator`) on the devices."""
        return self._put(new_metrics_accumulator())

    def __call__(self, state: TrainState, batch, acc: dict):
        """One step: ``(state, metrics, acc)`` after it (``state`` is donated)."""
        if self._mesh is not None:  # one clear line instead of an XLA sharding error
            sharding.check_batch_size(int(np.shape(batch["global_crops"])[0]), self._mesh)
        return self._jitted(state, batch, self.schedule, acc)

    def lower(self, state, batch) -> jax.stages.Lowered:
        """The step lowered for ``state`` and ``batch`` (arrays or ShapeDtypeStructs)."""
        acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated),
                           new_metrics_accumulator())
        return self._jitted.lower(state, batch, self.schedule, acc)


def batch_from_crops(crops: list[np.ndarray], nchw: bool = False) -> dict:
    """{'global_crops', 'local_crops'} from a list of per-crop (B, ...) arrays
    (first 2 global, then the local ones), optionally transposing NCHW -> NHWC."""
    if nchw:
        crops = [np.transpose(c, (0, 2, 3, 1)) for c in crops]
    batch = {"global_crops": np.stack(crops[:2], axis=1)}
    if len(crops) > 2:
        batch["local_crops"] = np.stack(crops[2:], axis=1)
    return batch
