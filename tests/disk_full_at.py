"""Run train.py as a disk that fills during a checkpoint would meet it, on any machine:
`python tests/disk_full_at.py EPOCH ARGS...` makes the checkpoint of epoch EPOCH fail half
written, as TensorFlow's SaveV2 fails on a full disk (ENOSPC), leaving its _temp folder."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machinery  # noqa: E402, F401  (TensorFlow, quietly)

import tensorflow as tf  # noqa: E402

full_at = int(sys.argv[1])
save = tf.train.CheckpointManager.save


def save_on_a_disk_that_fills(self, checkpoint_number=None, **kwargs):
    if checkpoint_number != full_at:
        return save(self, checkpoint_number=checkpoint_number, **kwargs)
    half_written = Path(self.directory) / f"ckpt-{full_at}_temp" / "part-00000-of-00001.data-00000-of-00001"
    half_written.parent.mkdir(parents=True)
    half_written.write_bytes(b"\0" * 1000)
    raise tf.errors.ResourceExhaustedError(None, None, f"{half_written.parent}/part-00000-of-00001.index."
                                           f"tempstate123; No space left on device [Op:SaveV2]")


tf.train.CheckpointManager.save = save_on_a_disk_that_fills
sys.argv = [str(ROOT / "train.py"), *sys.argv[2:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
