"""Runs a script under accelerate's FSDP with CPU processes (gloo); accelerate itself turns FSDP on only for GPUs.

    accelerate launch --config_file training/configs/accelerate_fsdp.yaml --num_processes 2 \
        tests/fsdp_on_cpu.py training/train_pixelrepa.py ...

Everything else is real: FSDP2 shards the parameters over the processes and gloo runs the collectives.
"""

import os
import runpy
import sys

import accelerate.state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

os.environ["ACCELERATE_USE_CPU"] = "1"
initialize_state = accelerate.state.AcceleratorState.__init__


def initialize_fsdp_state(self, *args, **kwargs):
    initialize_state(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets


accelerate.state.AcceleratorState.__init__ = initialize_fsdp_state
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
