"""The "nano" learning-parity recipe: the official code's Fashion-MNIST anchor, restated.

Same recipe as ``official_fmnist.py --subset 12800 --batch 128
--epochs 6 --lr 1e-3`` (the official VisionTransformer / DINOHead / DINOLoss /
AdamW trained on Fashion-MNIST), so ``benchmarks/learning_parity.py`` can put
the two side by side over seeds:

- ViT patch 4 on 28 px images, width 96 x 4 blocks, 3 heads, drop path 0.1;
  head 512 hidden / 64 bottleneck / K = 1024, last layer normalised and frozen
  for the first epoch;
- 2 global crops of 28 px (scale 0.4-1) + 6 local crops of 12 px (0.05-0.4),
  the official colour ops and the official blur range 0.1-2 px (not rescaled);
- batch 128, lr 1e-3 per 256 (peak 5e-4) with a 1-epoch warm-up then cosine to
  1e-6, weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1, teacher
  temperature 0.04 without warm-up, per-tensor clip 3.0;
- 6 epochs over ``train[:12800]`` (100 steps each: 600 steps);
- k-NN k = 20, T = 0.07 of the teacher on the raw 28 px images: the whole
  60k training set as the bank, the 10k test images as queries.

  python -m dino_jax.main --config=configs/fmnist_nano.py --workdir=/tmp/nano --config.seed=0

Sized for: a CPU (float32, the exact reference); a run takes 10-15 minutes on 2 cores.
Official result: the official code trained on this same recipe, over seeds, as
``benchmarks/learning_parity.py`` runs it; both sides' k-NN top-1 per seed are in
docs/parity.md ("Learning parity").
"""
from dino_jax.config_defaults import base_config


def get_config():
    c = base_config()
    c.model.arch = "custom"
    c.model.patch_size = 4
    c.model.embed_dim = 96
    c.model.depth = 4
    c.model.num_heads = 3
    c.model.img_size = 28
    c.model.drop_path_rate = 0.1
    c.model.out_dim = 1024
    c.model.head_hidden_dim = 512
    c.model.head_bottleneck_dim = 64
    c.model.norm_last_layer = True
    c.model.dtype = "float32"

    c.data.source = "fashion_mnist"
    c.data.path = "/usr/share/datasets/fashion-mnist"
    c.data.train_split = "train[:12800]"
    c.data.global_crop_size = 28
    c.data.local_crop_size = 12
    c.data.num_local_crops = 6
    c.data.global_crops_scale = (0.4, 1.0)
    c.data.local_crops_scale = (0.05, 0.4)
    c.data.blur_sigma = (0.1, 2.0)    # the anchor keeps the official range on 28 px images
    c.data.shuffle_buffer = 12800     # the whole subset: a full shuffle, as the DataLoader's
    c.data.eval_image_size = 28
    c.data.eval_resize_ratio = 1.0    # features of the raw 28 px images, as the anchor computes them

    c.batch_size = 128
    c.epochs = 6
    c.total_steps = 0
    c.lr = 0.001
    c.min_lr = 1e-6
    c.warmup_epochs = 1.0
    c.weight_decay = 0.04
    c.weight_decay_end = 0.4
    c.momentum_teacher = 0.996
    c.warmup_teacher_temp = 0.04
    c.teacher_temp = 0.04
    c.warmup_teacher_temp_epochs = 0
    c.freeze_last_layer = 1
    c.clip_grad = 3.0

    c.log_every_steps = 50
    c.checkpoint_every_steps = 100000  # only the final checkpoint
    c.keep_checkpoints = 1
    c.evals.knn.every_epochs = 0      # k-NN at the end only
    c.evals.knn.train_split = "train"
    c.evals.knn.eval_split = "test"
    c.evals.knn.k = 20
    c.evals.knn.temperature = 0.07
    c.evals.knn.max_train_examples = 0  # the whole 60k bank
    c.evals.knn.max_eval_examples = 0   # all 10k test images
    c.evals.knn.batch_size = 1000
    c.evals.knn.random_init = True    # the random-init teacher's k-NN: the baseline of the gain
    return c
