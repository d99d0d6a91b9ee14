"""Branch-Train-Merge itself: the seed run, branching, training and merging experts
(`phases`), and growing a forest with a new domain's expert branched from a posterior-weighted
average of existing experts (`growth`). Uses every layer below; knows nothing of the study."""
