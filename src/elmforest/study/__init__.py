"""The compute-matched study (`elmforest run`): the stages (`run`), the registry of arms it trains
(`arms`: each arm's recipe keys, stage, folder, models, methods and budget record), the methods it
scores (`methods`), the shared evaluation (`results`), results.json with intervals and claims (`summary`),
report.md and its plots (`report`), the run folder's ownership (`run_folder`), and the studies
built on it: incremental growth (`rounds`), removal (`removal`, `forest_eval`) and two runs side by
side (`compare`)."""
