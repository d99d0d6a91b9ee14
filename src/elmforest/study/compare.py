"""Two runs side by side (`elmforest compare`), and c-BTM's router as one more row.

c-BTM (`elmforest.cbtm.cluster`) trains one expert per discovered cluster; at inference it weights
the experts by the context's distance to the cluster centres, not by a domain posterior.
`router_row` scores a clustered run's forest that way on the same test windows as the study
(cached in RUN/router.json); `compare_runs` prints two runs' results.json rows side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elmforest.btm.seed import SEED_JSON, model_context, seed_dir

from elmforest import storage
from elmforest.cbtm.cluster import ClusterModel
from elmforest.cbtm.cluster_router import DEFAULT_TEMPERATURE, ClusterRouter, routed_logprobs, window_texts
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.combine.logprobs import expert_logprobs, mean_nll
from elmforest.errors import require
from elmforest.combine.forest import Forest, read_json
from elmforest.study.forest_eval import forest_tokens_flops, results_row
from elmforest.models.factory import param_count
from elmforest.study.report import fmt_ppl, method_rows
from elmforest.combine.scoring import load_experts, split_windows
from elmforest.data.tokens import token_array
from elmforest.data.tokenizer import load_tokenizer


def router_weights(router: Any, index: list[int], texts: list[str]) -> torch.Tensor:
    """[N, n] weights of the experts holding clusters `index` for each text, renormalised over
    those experts (rows sum to 1; the router caches each distinct text)."""
    w = torch.tensor([[float(router.weights_for(t)[c]) for c in index] for t in texts], dtype=torch.float64)
    return w / w.sum(1, keepdim=True)


def router_row(
    recipe: Recipe,
    run_dir: Path,
    clusterer_dir: Path,
    temperature: float | None = None,
    log: Callable[[str], Any] = print,
    top_k: int | None = None,
) -> dict[str, Any]:
    """`cbtm_ensemble_router`: the clustered forest mixed with c-BTM's router weights.

    Each test window (drawn from the whole split, as every method's) is routed by the decoded text
    of the C tokens before it in the split plus its own first token: all seen before the window's
    first prediction, so no test token routes its own prediction. Weights w_c = softmax(-|z -
    centre_c|^2 / T), the top-k of them renormalised, are constant across the window: log p =
    logsumexp_c(log w_c + log p_c). Expert clusterC takes centre C. Cached in RUN/router.json
    (recomputed when the temperature, top-k or windows differ).
    """
    run_dir = Path(run_dir)
    cache = run_dir / "router.json"
    temperature = temperature or DEFAULT_TEMPERATURE
    settings = {"temperature": temperature, "top_k": top_k, "window_seed": recipe.eval.window_seed,
                "max_tokens_per_domain": recipe.eval.max_tokens_per_domain}
    if cache.is_file():
        cached = read_json(cache, "router.json")
        if all(cached.get(k) == v for k, v in settings.items()):
            return cached
    router = ClusterRouter(ClusterModel.load(clusterer_dir), temperature, top_k=top_k)
    forest = Forest(run_dir / "forest")
    index = []
    for n in forest.names:
        require(n.startswith("cluster") and n[7:].isdigit() and int(n[7:]) < router.model.k,
                f"expert {n!r} is not one of the clusterer's cluster0..cluster{router.model.k - 1}", forest.path)
        index.append(int(n[7:]))
    models = load_experts(forest)
    tok_dir = run_dir / "tokenizer"
    tokenizer = load_tokenizer(tok_dir)
    corpus = Corpus(recipe.corpus)
    context = model_context(recipe, tok_dir)
    nll: dict[str, float] = {}
    for d in [*recipe.train_domains, *recipe.novel_domains]:
        log(f"router: evaluating {d}")
        windows = split_windows(corpus, tok_dir, d, "test", context, recipe.eval.max_tokens_per_domain, recipe.eval.window_seed)
        test, array = windows.tokens, token_array(corpus, tok_dir, d, "test")
        texts = window_texts(tokenizer, array, windows.starts.tolist(), context)
        w = router_weights(router, index, texts)  # [N, n]
        routed = w.sum(0)  # [n]: an expert no window routes to (top-k) never runs
        lp = expert_logprobs(models, test, recipe.eval.batch_size, prior=routed)  # [k, N, T]
        nll[d] = mean_nll(routed_logprobs(lp, w[:, routed > 0]))
    params = param_count(models[0])
    seed = read_json(seed_dir(run_dir) / SEED_JSON, "seed.json")
    _, flops = forest_tokens_flops(forest.path, seed)
    row = results_row(nll, recipe.train_domains, recipe.novel_domains, flops, len(models) * params)
    result = {"cbtm_ensemble_router": row, **settings, "clusterer": str(clusterer_dir)}
    storage.write_json(cache, result)
    return result


def compare_runs(run_a: Path, run_b: Path, extra_b: dict[str, Any] | None = None) -> str:
    """Two runs' results side by side: method, then train/novel means and each novel domain per run."""
    def rows(run: Path) -> dict[str, Any]:
        res = read_json(Path(run) / "results.json", "results.json")
        require("rounds" not in res, "an incremental run; compare its rounds in report.md", run)
        return method_rows(res)

    a, b = rows(run_a), {**rows(run_b), **(extra_b or {})}
    novel = sorted({d for r in [*a.values(), *b.values()] for d in r.get("novel", {})})
    header = ["method", "A train", "B train", *[f"{d} A/B" for d in novel], "A novel", "B novel"]
    body = []
    for m in list(dict.fromkeys([*a, *b])):
        ra, rb = a.get(m, {}), b.get(m, {})
        body.append([m, fmt_ppl(ra.get("train_mean")), fmt_ppl(rb.get("train_mean")),
                     *[f"{fmt_ppl(ra.get('novel', {}).get(d))}/{fmt_ppl(rb.get('novel', {}).get(d))}" for d in novel],
                     fmt_ppl(ra.get("novel_mean")), fmt_ppl(rb.get("novel_mean"))])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    legend = f"A = {run_a}, B = {run_b}; perplexities, means are geometric means over domains"
    return "\n".join([legend, fmt.format(*header), *(fmt.format(*row) for row in body)])
