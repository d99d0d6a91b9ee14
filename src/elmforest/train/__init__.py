"""Training one model: the one training loop (`loop`), its bookkeeping on disk (`state`), the
training spec and the sampler protocol it takes (`spec`), data-parallel process groups
(`distributed`) and the compute budget every arm shares (`budget`). Takes models and batches from
the layers below; knows nothing of forests, launchers or studies."""
