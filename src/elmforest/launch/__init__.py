"""Launching: where trainings run. `launchers` is the registry (sequential, local processes,
Ray, Slurm) and the only module that imports Ray; `worker` is what runs inside any of them (threads,
train.log, the job's ranks); `remote` syncs expert folders through an fsspec URL. A job is a plain
function of a folder, so nothing here knows what is being trained."""
