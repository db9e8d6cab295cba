"""Training on several processes: the process group (:mod:`.processes`), each rank's share of the rows
(:mod:`.shards`), the wrappers applied to an unchanged model from outside (:mod:`.parallel`: DDP, torchrec's
DistributedModelParallel) and the ``--nproc`` launcher (:mod:`.launch`)."""
