"""Write two small lm-evaluation-harness tasks from a corpus's test split (no hub needed).

    python scripts/lm_eval_demo_tasks.py data/demo lm_eval_tasks [--cloze-docs 10] [--text-docs 4]
    elmforest lm-eval runs/demo/forest --tasks demo_cloze,demo_text --include_path lm_eval_tasks

demo_cloze (multiple_choice: acc, acc_norm, and acc_mutual_info, which ranks the choices by
log p(choice | context) - log p(choice) and so asks which continuation the context predicts, not
which span is likely on its own: the metric that separates small models here): for --cloze-docs
test documents per domain (drawn with a fixed seed from the whole split, documents of at least
16 words), the context is the
document's first min(30, words - 8) words and the choices are its next 8 words against 8-word
spans taken from test documents of 3 other domains: which continuation belongs to this text.
demo_text (a group of loglikelihood_rolling tasks demo_text_<domain>: word_perplexity,
byte_perplexity, bits_per_byte): --text-docs test documents per domain, each cut to its first
--text-chars characters.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from elmforest.combine.harness import local_task_yaml
from elmforest.data.corpus import Corpus


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", help="corpus folder (e.g. data/demo)")
    ap.add_argument("out", help="folder for the task YAMLs and their JSONL files (pass it as --include_path)")
    ap.add_argument("--cloze-docs", type=int, default=10, help="cloze documents per domain")
    ap.add_argument("--text-docs", type=int, default=4, help="rolling-likelihood documents per domain")
    ap.add_argument("--text-chars", type=int, default=1000, help="characters kept of each rolling document")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    corpus = Corpus(args.corpus)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    cloze, text_tasks = [], []
    # every domain's test documents as words (those of at least 16 words): contexts and distractors
    pool = {d: [w for w in (t.split() for t in corpus.texts(d, "test")) if len(w) >= 16] for d in corpus.domains}
    for domain in corpus.domains:
        long_enough = pool[domain]
        picks = rng.sample(range(len(long_enough)), min(args.cloze_docs, len(long_enough)))
        for i in picks:
            words = long_enough[i]
            n_ctx = min(30, len(words) - 8)
            spans = []
            for other in rng.sample([d for d in corpus.domains if d != domain], 3):
                w = rng.choice(pool[other])
                s = rng.randrange(0, len(w) - 8 + 1)
                spans.append(" ".join(w[s : s + 8]))
            label = rng.randrange(4)
            spans.insert(label, " ".join(words[n_ctx : n_ctx + 8]))  # lm-eval puts " " before a choice
            cloze.append({"domain": domain, "context": " ".join(words[:n_ctx]), "choices": spans, "label": label})
        texts = [t for t in corpus.texts(domain, "test") if t.strip()]
        chosen = rng.sample(texts, min(args.text_docs, len(texts)))
        data = out / f"text_{domain}.jsonl"
        _write_jsonl(data, [{"text": t[: args.text_chars]} for t in chosen])
        yaml = local_task_yaml(f"demo_text_{domain}", data, "loglikelihood_rolling",
                               ["word_perplexity", "byte_perplexity", "bits_per_byte"])
        (out / f"demo_text_{domain}.yaml").write_text(yaml, encoding="utf-8")
        text_tasks.append(f"demo_text_{domain}")
    _write_jsonl(out / "cloze.jsonl", cloze)
    yaml = local_task_yaml("demo_cloze", out / "cloze.jsonl", "multiple_choice", ["acc", "acc_norm", "acc_mutual_info"])
    (out / "demo_cloze.yaml").write_text(yaml, encoding="utf-8")
    group = "group: demo_text\ntask:\n" + "".join(f"  - {t}\n" for t in text_tasks)
    group += "aggregate_metric_list:\n  - metric: bits_per_byte\n    weight_by_size: true\nmetadata:\n  version: 1.0\n"
    (out / "demo_text.yaml").write_text(group, encoding="utf-8")
    print(f"wrote {len(cloze)} cloze documents and {len(text_tasks)} rolling tasks to {out}")


if __name__ == "__main__":
    main()
