"""Branch-Train-Merge itself: the dense run and its seed snapshots (`seed`), branching, training
and merging experts (`experts`), their job records (`jobs`), and growing a forest with a new
domain's expert branched from a posterior-weighted average of existing experts (`growth`). Uses
every layer below; knows nothing of the study."""
