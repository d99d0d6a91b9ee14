"""Combining experts at inference: the forest folder (`forest`), the experts' log-probs on a set of
windows (`logprobs`, the one path every scorer takes), domain-posterior ensembles (`ensemble`), the
cached prior and its record (`prior`), mixing settings chosen on validation data (`mixing`),
parameter averaging (`averaging`), adapter experts' exact delta averaging and PEFT's cat merge
and Arrow router (`adapters`), windows and perplexity (`evaluate`), scoring forests from the
command line (`scoring`), generation (`generate`) and paired bootstrap intervals (`bootstrap`)."""
