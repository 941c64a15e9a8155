"""The stage-chaining runner: plans a config folder's units, trains each, hands weights forward; Slurm jobs."""
