"""Tensor and pipeline parallelism: one worker process per rank, ``torch.distributed`` between them.

- ``topology.py``: which rank is which tensor shard and pipeline stage; size checks against a model;
- ``comm.py``: the process groups (NCCL or gloo for tensors, gloo for step messages) of one rank;
- ``messages.py``: the typed messages the driver broadcasts (a step's inputs, LoRA changes, stop);
- ``worker.py``: the loop of a worker process (build the rank's model runner, run every step);
- ``executor.py``: the driver side, in the engine's process: spawns the node's workers, runs rank 0
  (the last stage's first tensor shard, which samples), watches the workers, shuts them down;
- ``headless.py``: a node that serves no HTTP, only its ranks (``pageant serve --headless``).
"""
