"""Defaults shared by every config in configs/: the official main_dino.py defaults.

Each value's comment says why it is what it is (mostly the official help text).
configs/*.py start from :func:`base_config` and override what their recipe
changes, commenting the provenance of each override.
"""
import importlib.util
import os

import ml_collections


def sibling_config(this_file: str, name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of ``configs/<name>`` beside ``this_file`` (configs/ is no package):
    how a recipe starts from another one and overrides a few fields."""
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
    spec = importlib.util.spec_from_file_location(f"dino_jax_config_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# Fields that moved under ``evals``: a config or command line naming the old field is
# refused with one line naming the new one (see :func:`check_renamed`).
RENAMED = {
    "knn_every_epochs": "evals.knn.every_epochs", "knn_k": "evals.knn.k",
    "knn_temperature": "evals.knn.temperature", "knn_max_train_examples": "evals.knn.max_train_examples",
    "knn_max_eval_examples": "evals.knn.max_eval_examples", "knn_batch_size": "evals.knn.batch_size",
    "knn_random_init": "evals.knn.random_init", "data.knn_train_split": "evals.knn.train_split",
    "data.eval_split": "evals.knn.eval_split", "retrieval": "evals.retrieval",
    "copy_detection": "evals.copy_detection", "video_segmentation": "evals.video_segmentation",
}


def renamed_message(old: str) -> str:
    """The one line that refuses the old field ``old`` (a key of :data:`RENAMED`)."""
    extra = " (k-NN off: evals.knn.every_epochs=-1)" if old == "data.eval_split" else ""
    return f"config field {old!r} is now {RENAMED[old]!r}{extra}"


def check_renamed(config=None, argv=()) -> None:
    """ValueError naming the new field when ``config`` holds, or ``argv`` overrides
    (``--config.<old>=...``), a field that moved under ``evals``; also when ``evals`` is
    not the block of evaluator settings (an old tuple of names)."""
    for arg in argv:
        if arg.startswith("--config."):
            name = arg[len("--config."):].split("=", 1)[0]
            for old in RENAMED:
                if name == old or name.startswith(old + "."):
                    raise ValueError(renamed_message(old))
            if name == "evals":
                raise ValueError("config.evals is a block per evaluator now: set "
                                 "--config.evals.<knn|linear|...>.every_epochs (-1 off)")
    if config is None:
        return
    for old in RENAMED:
        head, _, leaf = old.rpartition(".")
        node = config[head] if head and head in config else (config if not head else None)
        if node is not None and leaf in node:
            raise ValueError(renamed_message(old))
    if "evals" in config and not hasattr(config.evals, "items"):
        raise ValueError("config.evals is a block per evaluator now (evals.knn, evals.linear, ...), each "
                         "with every_epochs (-1 off), not a list of names")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---------------- model ----------------
    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_small"        # vit_tiny | vit_small | vit_base | custom (then embed_dim/depth/num_heads)
    c.model.patch_size = 16           # 8 gives better features at ~4x the compute
    c.model.embed_dim = 384           # used only when arch == 'custom'
    c.model.depth = 12                # used only when arch == 'custom'
    c.model.num_heads = 6             # used only when arch == 'custom'
    c.model.img_size = 224            # position-embedding grid; other crop sizes interpolate it
    c.model.drop_path_rate = 0.1      # stochastic depth of the student (teacher: none)
    c.model.out_dim = 65536           # prototypes K of the DINO head
    c.model.norm_last_layer = True    # freeze g=1 of the weight-normed last layer: more stable;
                                      # official recipes use False for ViT-S, True for ViT-B
    c.model.head_nlayers = 3          # head MLP layers before the L2 bottleneck (official nlayers)
    c.model.head_hidden_dim = 2048    # head MLP width
    c.model.head_bottleneck_dim = 256 # L2-normalised bottleneck before the weight-normed last layer
    c.model.dtype = "float32"         # compute dtype: float32 | bfloat16 (mixed precision, params stay
                                      # fp32) | auto (bfloat16 on GPU/TPU, float32 on CPU; the recipe
                                      # configs' default). Official default is fp16 autocast; float32 is
                                      # the exact reference (quickstart, tests).
    c.model.fused_attention = False   # deviation: jax.nn.dot_product_attention (cuDNN flash on GPU in bf16/fp16)
    c.model.platform_ops = "auto"     # auto | cpu | generic: the form of a few operations (same values);
                                      # auto: CPU forms in programs lowered for CPU, generic otherwise
    c.model.remat = False             # rematerialise blocks (all but the last): less memory, ~30% more compute
    # DINOv2 backbones (configs/dinov2_*.py; the defaults are DINO's ViT):
    c.model.num_register_tokens = 0   # learned register tokens after CLS, no position embedding (hub _reg: 4)
    c.model.layerscale_init = 0.0     # LayerScale: per-channel gains on each residual branch, initialised
                                      # to this value; 0 = none (DINO). DINOv2's hub builds with 1.0
    c.model.ffn = "mlp"               # block FFN: mlp (fc1, GELU, fc2) | swiglu (DINOv2 ViT-g: w12, SiLU gate, w3)
    c.model.interpolate_offset = 0.1  # position-embedding resize: scale (grid + offset) / side as the official
                                      # code; 0 = resize to the exact grid (DINOv2 _reg models)
    c.model.interpolate_antialias = False  # antialiased bicubic resize (PyTorch antialias=True; DINOv2 _reg)
    c.model.mask_token = False        # DINOv2's learned mask token (a parameter of its released weights;
                                      # replaces the patch embeddings where a mask is given)

    # ---------------- objective ----------------
    c.momentum_teacher = 0.996        # EMA base, cosine to 1; use 0.9995 for batch 256
    c.warmup_teacher_temp = 0.04      # initial teacher temperature
    c.teacher_temp = 0.04             # final teacher temperature; >0.07 is unstable
    c.warmup_teacher_temp_epochs = 0  # linear warm-up of the teacher temperature (official README uses 30)
    c.student_temp = 0.1              # student softmax temperature (official DINOLoss default)
    c.center_momentum = 0.9           # center <- m center + (1 - m) batch mean of teacher outputs

    # ---------------- optimisation ----------------
    c.batch_size = 512                # GLOBAL batch (official: batch_size_per_gpu 64 x 8 GPUs)
    c.epochs = 100                    # official default (vanilla ViT-S/16 run)
    c.total_steps = 0                 # > 0 overrides epochs * steps_per_epoch (schedules span it)
    c.lr = 0.0005                     # peak lr for batch 256; scaled by batch_size / 256
    c.min_lr = 1e-6                   # end of the cosine
    c.warmup_epochs = 10.0            # linear lr warm-up from 0 (fractions allowed for short runs)
    c.weight_decay = 0.04             # cosine from weight_decay ...
    c.weight_decay_end = 0.4          # ... to weight_decay_end: more decay late helps ViTs
    c.clip_grad = 3.0                 # per-tensor gradient-norm clip; 0 disables
    c.freeze_last_layer = 1           # epochs with the head's last layer frozen
    c.adam_b1 = 0.9                   # AdamW betas and epsilon: PyTorch's defaults, which the official
    c.adam_b2 = 0.999                 # code keeps (torch.optim.AdamW(params_groups))
    c.adam_eps = 1e-8                 # (PyTorch AdamW default eps)
    c.num_fsdp = 1                    # >1: shard params/optimiser state over an 'fsdp' mesh axis

    # ---------------- data (dino_jax/data) ----------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"            # fashion_mnist | tfds | image_folder | synthetic (random crops of
                                      # these shapes made on device, no TensorFlow: benchmarks, TF-less hosts)
    c.data.synthetic_num_examples = 1281167  # 'synthetic': images per epoch (ImageNet-1k train), for schedules
    c.data.path = ""                  # image_folder: a root with split sub-folders (root/<split>/<class>/img,
                                      # or root/<split>/ of images at any depth: no labels), or a .txt
                                      # file listing image paths (one a line; unlabeled); Fashion-MNIST:
                                      # the IDX dir
    c.data.tfds_name = "imagenet2012" # TFDS dataset, prepared offline in tfds_data_dir
    c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # None: ~/tensorflow_datasets
    c.data.train_split = "train"      # pre-training split; slices such as "train[:10000]" work
    c.data.global_crop_size = 224     # official: RandomResizedCrop(224) for the 2 global views
    c.data.local_crop_size = 96       # official: RandomResizedCrop(96) for the local views
    c.data.global_crops_scale = (0.4, 1.0)   # official default; 0.14-1 without multi-crop
    c.data.local_crops_scale = (0.05, 0.4)   # official default
    c.data.num_local_crops = 8        # official local_crops_number; 0 disables multi-crop
    c.data.blur_sigma = (0.1, 2.0)    # Gaussian-blur sigma range in pixels (official, for 224/96 px crops)
    c.data.shuffle_buffer = 16384     # TFDS (sequential) sources only: shuffle buffer in examples
    c.data.num_parallel_calls = -1    # AUTOTUNE
    c.data.prefetch = 2               # batches prefetched by tf.data on the host (0: AUTOTUNE)
    c.data.device_prefetch = 2        # batches already put on the devices while a step runs (thread)
    c.data.eval_image_size = 224      # evaluation centre crop (official: 224)
    c.data.eval_resize_ratio = 256 / 224     # shorter side resized to crop x this first (official 256/224)
    # Photometric augmentation on the accelerator (off: all of it in tf.data on the host,
    # the official placement). True: the host only decodes and cuts/resizes the crops
    # (uint8, rounded as PIL's resize) and ships each crop's random decisions, drawn from
    # (seed, example position) as before; the train step then flips, colour-jitters,
    # grays, blurs, solarizes and normalises them in JAX (dino_jax/data/device_augment.py).
    # Same decisions and formulas; use it when the host CPUs cannot feed the device
    # (docs/data.md: which mode on which hardware).
    c.data.device_augment = False     # see the comment above
    # Photometric ops through PIL itself, as the official torchvision transforms run them
    # (uint8 after the resize and after every op, PIL's box-approximated GaussianBlur,
    # PIL's HSV hue shift), on the same random decisions, via tf.numpy_function (slow:
    # holds the GIL; for small images and fidelity checks such as the learning-parity
    # runs). Off: the float tf/XLA ops (docs/data.md: documented deviations). Not with
    # device_augment.
    c.data.pil_ops = False            # see the comment above

    # ---------------- loop, checkpoints, logging ----------------
    c.seed = 0                        # params init, drop path and augmentation seeds (official default)
    c.init_from = ""                  # warm start (when the workdir has no checkpoint yet): an official
                                      # .pth (release backbone or full training checkpoint), a dino_jax
                                      # params dir, or another run's workdir (see dino_jax/warm_start.py)
    c.log_every_steps = 10            # progress line + TensorBoard scalars
    c.checkpoint_every_steps = 1000   # async Orbax save
    c.keep_checkpoints = 3            # keep the last K ...
    c.keep_every_steps = 0            # ... plus every step multiple of this (0: none), official saveckp_freq
    # ---------------- evaluation of the teacher (dino_jax/eval/base.py) ----------------
    # One block per evaluator. Each block's every_epochs says when it runs: -1 off, 0 at the
    # end of training only, N > 0 every N epochs and at the end. The same blocks drive the
    # periodic evaluation, the final one and the python -m dino_jax.eval.* programs.
    c.evals = ml_collections.ConfigDict()
    c.evals.knn = ml_collections.ConfigDict(dict(
        every_epochs=-1,              # -1 off; 0 end only; N every N epochs (recipes: 0 or 10)
        train_split="train",          # feature bank split
        eval_split="validation",      # split classified (ImageNet's validation set)
        k=20,                         # neighbours of the reported k-NN (official eval_knn also reports 10/100/200)
        temperature=0.07,             # vote weight exp(similarity / T), official
        max_train_examples=0,         # cap the bank (0 = whole split): keeps periodic eval cheap
        max_eval_examples=0,          # cap the evaluated images (0 = whole split)
        batch_size=256,               # global batch of the feature extraction
        random_init=False,            # also k-NN the teacher the run started from (random init, or the
                                      # init_from weights) at the end: the baseline the quickstart shows
    ))
    c.evals.linear = ml_collections.ConfigDict(dict(
        every_epochs=-1,              # -1 off; 0 end only; N every N epochs
        train_split="train",          # split the classifier is trained on
        eval_split="validation",      # split it is scored on
        n_last_blocks=4,              # CLS tokens of the last blocks, concatenated (official: 4 ViT-S, 1 ViT-B)
        avgpool=False,                # add the mean patch token (official: True for ViT-B, with 1 block)
        feature_layout="dino",        # dino: the official layout; dinov2: DINOv2's evaluation features (CLS
                                      # tokens of the last blocks, then the pooled patch token, any n_last_blocks)
        epochs=100,                   # official eval_linear default
        batch_size=1024,              # global batch (official 128 per GPU x 8)
        lr=0.001,                     # for batch 256, scaled by batch_size / 256 (official)
        weight_decay=0.0,             # official default
        max_eval_examples=0,          # cap the scored images (0 = whole split)
    ))
    c.evals.retrieval = ml_collections.ConfigDict(dict(
        every_epochs=-1,              # -1 off; 0 end only; N every N epochs
        data_path="",                 # folder holding roxford5k/ and rparis6k/ (jpg/ + gnd_*.pkl)
        dataset="roxford5k",          # roxford5k | rparis6k
        imsize=224,                   # official: images shrunk (aspect kept) to fit imsize x imsize
        multiscale=False,             # official option: mean of the features at scales 1, 1/sqrt2, 1/2
    ))
    c.evals.copy_detection = ml_collections.ConfigDict(dict(
        every_epochs=-1,              # -1 off; 0 end only; N every N epochs
        data_path="",                 # Copydays: original/ and strong/ (+ optional distractor folder)
        whitening_path="",            # folder of images the PCA whitening is learned on (official: 20k YFCC)
        distractors_path="",          # optional database distractors (official: 10k YFCC)
        imsize=320,                   # official: resize to imsize x imsize (aspect not kept)
    ))
    c.evals.video_segmentation = ml_collections.ConfigDict(dict(
        every_epochs=-1,              # -1 off; 0 end only; N every N epochs
        data_path="",                 # DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017)
        output_dir="",                # where the propagated masks are written ('' = a temporary folder)
        n_last_frames=7, size_mask_neighborhood=12, topk=5,   # official defaults
        max_videos=0,                 # 0: every video of val.txt; >0 keeps periodic runs short
    ))
    c.stop_on_nonfinite = True        # stop (after keeping the last good checkpoint) on NaN/inf loss;
                                      # False (deviation): skip such steps (update dropped) and go on
    return c
