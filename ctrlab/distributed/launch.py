"""``ctrlab train --nproc N`` (or a recipe's ``distributed.processes: N``): start N training processes on this
machine with torchrun's own launcher, as ``torchrun --standalone --nproc_per_node N -m ctrlab train ...`` would.

The launching process checks the recipe and the output folder first, so a user error is reported once, before any
process starts. The launcher is torch's elastic agent (``torch.distributed.launcher.api.elastic_launch``): it picks a
free port, starts the workers with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set and, when one fails, stops the others.
Unless ``OMP_NUM_THREADS`` is set, each worker gets its share of the cores. Each worker prints its own one-line
error; the launcher's exit status is the failed worker's (2 for a user error,
130 on Ctrl-C), with none of the agent's failure report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence


def launch_workers(nproc: int, arguments: Sequence[str]) -> int:
    """Run ``python -m ctrlab <arguments>`` in ``nproc`` processes of one torchrun world; the exit status of the
    run (0, or the lowest-ranked failed worker's)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs every start, signal and failure; the workers say what went wrong themselves.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # As torchrun does: N workers each taking every core would oversubscribe the CPU (train.num_threads, set in
    # the recipe, still wins inside each worker).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ctrlab-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "ctrlab", *arguments)
    except SignalException as signalled:  # the agent stopped the workers (each reported it) and re-raises
        return 128 + int(signalled.sigval)
    except ChildFailedError as failed:
        # Once one worker fails, the agent stops the others (SIGTERM: they exit 143); the status that tells what
        # happened is the lowest-ranked one that was not such a stop.
        codes = [failed.failures[rank].exitcode for rank in sorted(failed.failures)]
        codes = [code if code > 0 else 128 - code for code in codes]  # killed by signal N: 128 + N, as a shell says
        return next((code for code in codes if code != 128 + signal.SIGTERM), codes[0])
    return 0
