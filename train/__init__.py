"""Everything that turns configs into a run: config schema, GPT model, data, DeepSpeed engine, loop."""

import os
import warnings

import torch

# Before anything imports DeepSpeed (the model's MoE layers do): on a machine without CUDA, its CPU
# accelerator, chosen quietly rather than after a warning that it found no GPU. A GPU machine and a
# DS_ACCELERATOR of the user's are left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed's ZeRO gathers with the collective torch renamed; torch warns on every rank of every
# multi-rank run. Not the user's to act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning)
