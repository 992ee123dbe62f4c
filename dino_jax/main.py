"""DINO pre-training: ``python -m dino_jax.main --config=configs/vit_s8.py --workdir=DIR``.

Parses the flags and the config and calls :func:`dino_jax.trainer.train_and_evaluate`:
it resumes from the latest complete checkpoint in ``--workdir`` if there is one,
trains, checkpoints (asynchronously, every ``checkpoint_every_steps`` and at the
end; on SIGTERM before exiting), logs (stdout progress with ETA, TensorBoard,
JSON-lines ``log.txt``), and evaluates the teacher (``config.evals``). The last
stdout line is a JSON summary; bad input exits 1 with one ``error:`` line.

Any config field can be overridden: ``--config.batch_size=1024 --config.model.dtype=bfloat16``.
Several hosts: TPU pods and SLURM/Open MPI GPU clusters are detected; elsewhere set
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` or the flags below.
"""
from __future__ import annotations

import json
import os
import sys

from dino_jax import runtime

if __name__ == "__main__":
    runtime.reexec_with_tcmalloc()  # before JAX and TF allocate anything
runtime.set_xla_cpu_defaults()  # before jax is imported

# The rest after the two calls above, which must run before jax is imported.
import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dino_jax import checkpoint, config_defaults, trainer  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (a Python file with get_config()); fields can be "
    "overridden as --config.field=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, log.txt and TensorBoard events. "
                    "An existing run in it is resumed from its latest complete checkpoint.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs "
                    "where it is not detected (default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) of a multi-host run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-host run.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None or FLAGS.workdir is None:
        print("error: --config and --workdir are required "
              "(e.g. --config=configs/quickstart.py --workdir=/tmp/dino)", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    try:
        trainer.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        summary = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (trainer.TrainingError, checkpoint.CheckpointError, ValueError) as e:
        # DataError and WarmStartError are ValueErrors too: one line, no traceback.
        if os.environ.get("DINO_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    try:  # an evaluation field that moved (--config.knn_k=...): one line, before absl's flag parsing
        config_defaults.check_renamed(None, sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
