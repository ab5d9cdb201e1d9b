"""Run a script with the CPU split into two logical devices, "CPU:0" and "CPU:1", so that
tf.distribute can be tested without two GPUs:

    python tests/two_cpus.py train.py --strategy mirrored --devices CPU:0,CPU:1 ...
"""

import runpy
import sys
from pathlib import Path

import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
