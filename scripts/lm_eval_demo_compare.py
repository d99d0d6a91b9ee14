"""Paired 95% intervals for the README's demo-task table: a forest against another target,
document by document, on the tasks `scripts/lm_eval_demo_tasks.py` writes.

    python scripts/lm_eval_demo_compare.py TASKS FOREST DENSE [--prior flat] [--posterior full_prefix]

demo_cloze: the difference in acc_mutual_info (the same requests lm-eval sends: context + " " +
choice, and "" + " " + choice); demo_text: the ratio of pooled bits/byte (the forest's over the
other's), train domains and novel domains apart. Bootstrap: 10,000 resamples of documents, seed 0.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lm_eval.api.instance import Instance

from elmforest.combine.harness import ElmforestLM


def scores(lm: ElmforestLM, cloze: list[dict], texts: list[str]) -> tuple[list[int], list[float]]:
    """(per cloze document: 1 if acc_mutual_info picks the label, per text: its log-likelihood)."""
    pairs = [(r["context"], " " + c) for r in cloze for c in r["choices"]]
    cond = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)]
    alone = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, ("", c), 0) for _, c in pairs], disable_tqdm=True)]
    right = [int(max(range(4), key=lambda j: cond[4 * i + j] - alone[4 * i + j]) == r["label"]) for i, r in enumerate(cloze)]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts], disable_tqdm=True)
    return right, rolling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tasks")
    ap.add_argument("forest")
    ap.add_argument("other")
    ap.add_argument("--prior", default="flat")
    ap.add_argument("--posterior", default="full_prefix")
    ap.add_argument("--train-domains", default="news,legal,code,health_tweets,drama,speeches")
    args = ap.parse_args()
    tasks = Path(args.tasks)
    cloze = [json.loads(line) for line in (tasks / "cloze.jsonl").read_text(encoding="utf-8").splitlines()]
    docs = [(f.stem[len("text_"):], json.loads(line)["text"]) for f in sorted(tasks.glob("text_*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()]
    texts = [t for _, t in docs]
    forest = scores(ElmforestLM(pretrained=args.forest, prior=args.prior, posterior=args.posterior, batch_size=16), cloze, texts)
    other = scores(ElmforestLM(pretrained=args.other, batch_size=16), cloze, texts)
    rng = random.Random(0)
    diff = [f - o for f, o in zip(forest[0], other[0])]
    boot = sorted(sum(diff[rng.randrange(len(diff))] for _ in diff) / len(diff) for _ in range(10000))
    print(f"demo_cloze acc_mutual_info: forest {sum(forest[0]) / len(cloze):.3f}, other {sum(other[0]) / len(cloze):.3f}, "
          f"difference {sum(diff) / len(diff):+.3f} (95% CI {boot[249]:+.3f} to {boot[9749]:+.3f}; {len(cloze)} documents)")
    nbytes = [len(t.encode("utf-8")) for t in texts]
    train = set(args.train_domains.split(","))
    for name, idx in (("train", [i for i, (d, _) in enumerate(docs) if d in train]),
                      ("novel", [i for i, (d, _) in enumerate(docs) if d not in train])):
        def ratio(ids: list[int]) -> float:
            return sum(forest[1][i] for i in ids) / sum(other[1][i] for i in ids)  # byte counts cancel

        boot = sorted(ratio([idx[rng.randrange(len(idx))] for _ in idx]) for _ in range(10000))
        size = sum(nbytes[i] for i in idx)
        print(f"demo_text {name} domains: bits/byte ratio forest/other {ratio(idx):.4f} "
              f"(95% CI {boot[249]:.4f} to {boot[9749]:.4f}; {len(idx)} documents, {size:,} bytes)")


if __name__ == "__main__":
    main()
