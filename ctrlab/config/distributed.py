"""Recipe section ``distributed``: how many processes train, how they talk, and where torchrec tables live.

Data parallelism follows PyTorch's own engine: ``torchrun`` starts the processes (``ctrlab train --nproc N`` starts
it for you), each process trains a replica on its shard of the training split, and gradients are averaged by
``DistributedDataParallel``. With ``sharding`` the torchrec tables are split across the processes by torchrec's
planner instead of replicated (``DistributedModelParallel``); the dense layers stay replicated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ctrlab.config.base import Int, Section

MAX_PROCESSES = 1_024

class DistributedConfig(Section):
    """Processes, communication backend and embedding-table sharding.

    ``processes`` is the world size ``ctrlab train`` launches when it is not already running under ``torchrun``;
    under ``torchrun`` the launcher's world size is used, and a ``processes`` other than 1 must equal it.
    ``train.batch_size`` stays the *global* batch: each of N processes steps on ``batch_size / N`` rows, so a run
    on N processes follows the same optimisation as one on one process.
    """

    processes: Int = Field(1, ge=1, le=MAX_PROCESSES, description="processes on this machine (ctrlab launches them "
                           "with torchrun); under torchrun its world size is used")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend: auto is nccl "
                                                     "on CUDA, gloo on CPU")
    sharding: Literal["none", "auto", "table_wise", "row_wise", "column_wise", "table_row_wise",
                      "table_column_wise"] = Field(
        "none", description="place embedding.backend torchrec tables with torchrec's planner (auto) or force one "
        "sharding type; none replicates them like every other weight")
    timeout_minutes: Int = Field(120, ge=1, le=10_080, description="how long a process waits for the others at a "
                                 "collective (rank 0 alone prepares the data cache while the others wait)")
