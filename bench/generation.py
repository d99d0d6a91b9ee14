"""Generation speed: an ensemble of 3 experts with and without KV cache, and one model alone.

`elmforest.combine.generate.generate` continues a prompt greedily (the same tokens every run, so every
contender does the same work). With the cache each active expert keeps its own KV cache: the
prompt costs one forward pass per expert, then each new token one single-token step per expert.
Without the cache every expert re-reads the whole sequence for every new token. Expected: a
3-expert ensemble with cache runs at about 1/3 of the single model's tokens/s (plus the mixing),
and the cache's advantage grows with the sequence length.
"""

from __future__ import annotations

import time
import warnings

import torch

import record
from elmforest.config import ModelConfig
from elmforest.combine.generate import generate
from elmforest.models.factory import build_model, resolve_spec


def main() -> None:
    a = record.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1 if a.quick else 2)  # quick: a smoke test on a shared machine
    warnings.filterwarnings("ignore")
    size, vocab, prompt_len, new = ("tiny", 512, 8, 8) if a.quick else ("demo", 4096, 32, 96)
    repeats = a.repeats or (1 if a.quick else 5)

    spec = resolve_spec(ModelConfig(size=size), vocab)
    models = [build_model(spec, seed) for seed in range(3)]
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    contenders = {
        "ensemble of 3, KV cache": (models, True),
        "ensemble of 3, no cache": (models, False),
        "single model, KV cache": (models[:1], True),
        "single model, no cache": (models[:1], False),
    }
    produced: dict[str, list[int]] = {}

    def run(name: str) -> float:
        ms, cache = contenders[name]
        t = time.perf_counter()
        out = generate(ms, None, prompt, new, greedy=True, use_cache=cache)
        seconds = time.perf_counter() - t
        produced.setdefault(name, out)
        return len(out) / seconds

    run("single model, KV cache")  # warm-up
    results = record.interleaved(list(contenders), repeats, run)
    ens_cached = record.median(results["ensemble of 3, KV cache"])
    single_cached = record.median(results["single model, KV cache"])
    rows = []
    for name in contenders:
        tps = record.median(results[name])
        rows.append([name, f"{tps:,.1f}", record.spread(results[name], "{:,.1f}"), f"{tps / ens_cached:.2f}",
                     f"{tps / single_cached:.2f}"])
    table = record.markdown_table(
        ["generator", "new tokens/s (median)", "range", "x ensemble cached", "x single cached"], rows
    )
    same = produced["ensemble of 3, KV cache"] == produced["ensemble of 3, no cache"]
    notes = [
        f"Cached and uncached ensembles produce the same {new} tokens: {'yes' if same else 'NO'} (greedy).",
        "Ideal ensemble/single ratio with cache: 1/3 = 0.33 (three single-token steps per new token).",
    ]
    settings = (
        f"3 random-init {size} models (vocab {vocab}), prompt {prompt_len} tokens, {new} new tokens, greedy, "
        f"batch 1, {repeats} interleaved repeats, torch threads {torch.get_num_threads()}"
    )
    record.emit("generation", settings, table, notes, a.quick)


if __name__ == "__main__":
    main()
