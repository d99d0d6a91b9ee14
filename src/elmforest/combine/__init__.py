"""Combining experts at inference: the forest folder (`forest`), domain-posterior ensembles
(`ensemble`), mixing settings chosen on validation data (`mixing`), parameter averaging (`averaging`),
windows and perplexity (`evaluate`), scoring forests from the command line (`scoring`), generation
(`generate`) and paired bootstrap intervals (`bootstrap`)."""
