"""Launching: where trainings run. `launchers` is the registry (sequential, local processes,
Ray, Slurm) and `run_jobs`; `jobs` what every launcher shares (a job, its retries, the shape of a
launcher); `cluster_launchers` the Ray and Slurm launchers, the only module that imports Ray or
submitit; `worker` is what runs inside any of them (threads, train.log, the job's ranks); `remote`
syncs expert folders through an fsspec URL. A job is a plain function of a folder, so nothing here
knows what is being trained."""
