"""The machinery around the tutorial's code: what runs it fast and safely, and what the
scripts share. The tutorial's model and loss (network.py) call none of it; train_step takes
its batch's parts from steps.parts, and train.fit compiles it with steps.compiled_train_steps.
Its modules:

  cli             flags with their defaults in --help; one-line errors (exit code 2 for bad input)
  files           folders checked and held by one run, files written whole, a .keras model read back
  settings        a run's settings, one dataclass: its flags, config.json, --resume's checks
  run_folder      config.json, --resume and --overwrite, one run per folder
  records         checkpoints, metrics.csv, TensorBoard and the progress bar of a run
  faults          Ctrl-C and SIGTERM between steps; a full disk, a GPU out of memory, a lost worker
  launch          a training run's start and end, around train.fit
  distribute      tf.distribute: --strategy, each replica's batch, the chief, the workers' agreement
  steps           train_step compiled: many steps a tf.function call; a batch's replicas and shards
  speed           --shards and their threads; evaluate.py's faster logits layer
  hardware        the CPU or GPU, and whether bf16 pays there
  data_files      Keras .npz and MNIST IDX files, read and checked
  image_folder    a folder of images: its classes, split and fingerprint; image_decoding decodes it
  resumable       evaluate.py's kept batches, so that a stopped evaluation goes on
  projector       TensorBoard's Projector files; model_size, a model's parameters and FLOPs
  explore_server  explore.py's web server: its page (explore.html) and requests, each bad one a 4xx

Importing the package, or any module of it, first loads TensorFlow without its C++ start-up
logs, so that a terminal shows the scripts' own lines, and lets a GPU's memory be taken as
needed (TF_FORCE_GPU_ALLOW_GROWTH=false: all at once).
"""

from __future__ import annotations

import os
import sys

TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
GPU_MEMORY_GROWTH = "TF_FORCE_GPU_ALLOW_GROWTH"  # TensorFlow's own switch, read when it starts a GPU


def _load_tensorflow_quietly() -> None:
    """Load TensorFlow and find its devices with file descriptor 2 sent to /dev/null (its
    C++ libraries write there, not to sys.stderr), then log only its errors from then on;
    TF_CPP_MIN_LOG_LEVEL=0 or 1 keeps every line."""
    os.environ.setdefault(TF_LOG_LEVEL, "2")
    os.environ.setdefault(GPU_MEMORY_GROWTH, "true")  # leave the rest to a notebook or another run
    if os.environ[TF_LOG_LEVEL] in ("0", "1"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    tf.get_logger().setLevel("WARNING")  # where Python is interactive (Jupyter) it says INFO too


_load_tensorflow_quietly()
