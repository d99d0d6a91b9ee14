"""The forest's tokenizer: byte-level BPE trained on the corpus, saved as a Hugging Face folder.

Every expert of a forest shares one tokenizer (their next-token distributions are mixed token
by token, so the vocabularies must be identical). It is a GPT-2-style byte-level BPE: text is
first mapped to bytes, so any string round-trips exactly (`decode(encode(x)) == x`, unicode,
newlines and leading spaces included) and nothing is ever unknown. One special token,
`<|endoftext|>`, separates documents and serves as bos/eos/pad/unk.

    TOKENIZER/
      tokenizer.json            the `tokenizers` model (vocabulary, merges, byte-level pipeline)
      tokenizer_config.json     what `transformers.AutoTokenizer` needs (class, special tokens)
      special_tokens_map.json
      elmforest_tokenizer.json  how it was trained (domains, vocabulary size, sampled bytes)

`tokenizer_hash` names a tokenizer by its content; token caches and forests record it, so a
forest never mixes experts trained with different tokenizers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elmforest import storage
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TRAINING_FILE = "elmforest_tokenizer.json"

# Byte-level BPE starts from the 256 byte symbols plus the special token, so the smallest
# vocabulary that still leaves room for merges is 257 (config.TokenizerConfig asks for >= 260).
MIN_VOCAB = 257


def _sample_rank(text: str) -> int:
    """A document's place in the tokenizer sample: a hash of its text, independent of the one
    `corpus.split_of` uses to pick splits (it is personalised), so train documents are not skewed."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"elm-tokenizer").digest(), "big")


def _sample_documents(corpus: Corpus, domain: str, budget: int) -> Iterator[str]:
    """Yield `budget` bytes (or all there is) of a domain's train split, chosen at random.

    A bottom-k sample: rank documents by a hash of their text and keep the lowest-ranked ones
    until their bytes reach the budget, the last one cut to fit. Deterministic, uniform over the
    whole split (the files keep source order, often by topic or date, so the first lines would be
    biased), and exactly on budget. Costs two reads of the split; one when it fits the budget.
    """
    stats = corpus.manifest["domains"][domain].get("splits", {}).get("train", {})
    threshold: int | None = None  # documents ranked below it are taken whole
    if int(stats.get("bytes") or 2**62) > budget:
        ranked = sorted((_sample_rank(t), len(t.encode("utf-8"))) for t in corpus.texts(domain, "train"))
        total = 0
        for rank, size in ranked:
            total += size
            if total >= budget:
                threshold = rank
                break
    left = budget
    for text in corpus.texts(domain, "train"):
        if left <= 0:
            return
        if threshold is not None and _sample_rank(text) > threshold:
            continue
        data = text.encode("utf-8")
        if len(data) > left:  # the document that crosses the budget is cut (at a character boundary)
            data = data[:left]
            text = data.decode("utf-8", errors="ignore")
        left -= len(data)
        yield text


def train_tokenizer(
    corpus: Corpus,
    domains: list[str],
    vocab_size: int,
    out: Path,
    sample_bytes_per_domain: int = 4_000_000,
) -> Path:
    """Train a byte-level BPE tokenizer on the train splits of `domains`; save it to `out`.

    Each domain contributes the same byte budget (`sample_bytes_per_domain`, or all it has when
    smaller), so a large domain cannot dominate the merges. Training is deterministic: the same
    corpus and arguments give the same `tokenizer_hash`. The folder is built in a temporary
    sibling and renamed into place when complete; an existing tokenizer is never overwritten.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out)
    if vocab_size < MIN_VOCAB:
        raise ElmError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB}")
    if sample_bytes_per_domain <= 0:
        raise ElmError(f"sample_bytes_per_domain={sample_bytes_per_domain} must be positive")
    if not domains:
        raise ElmError("no domains to train the tokenizer on", corpus.path)
    corpus.require(domains)
    if out.exists() and any(out.iterdir()):
        raise ElmError("tokenizer folder exists and is not empty; choose another --out or delete it", out)
    if out.exists():
        out.rmdir()

    sampled = {d: 0 for d in domains}

    def texts() -> Iterator[str]:
        for d in domains:  # fixed order: the trainer sees the same stream every time
            for text in _sample_documents(corpus, d, sample_bytes_per_domain):
                sampled[d] += len(text.encode("utf-8"))
                yield text

    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer regex splits words/numbers/punctuation with their leading space;
    # no prefix space is added, so encoding is a pure function of the text and round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    if sum(sampled.values()) == 0:
        raise ElmError(f"the train splits of {', '.join(domains)} hold no text", corpus.path)

    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        # The class name both transformers 4.x and 5.x resolve to their fast tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # else decode() would rewrite " ." to "."
        "model_max_length": 1_000_000_000,
    }
    training = {
        "format": "elmforest-tokenizer/1",
        "corpus": str(corpus.path),
        "domains": list(domains),
        "vocab_size_requested": vocab_size,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "sample_bytes_per_domain": sample_bytes_per_domain,
        "sampled_bytes": sampled,
    }
    with storage.atomic_dir(out) as tmp:
        storage.write_text(tmp / TOKENIZER_FILE, tok.to_str(pretty=True))
        storage.write_json(tmp / CONFIG_FILE, config)
        storage.write_json(tmp / SPECIAL_TOKENS_FILE, special)
        training["tokenizer_hash"] = tokenizer_hash(tmp)
        storage.write_json(tmp / TRAINING_FILE, training)
    return out


def _read_tokenizer_json(path: Path) -> dict[str, Any]:
    folder = Path(path)
    file = folder / TOKENIZER_FILE
    if not folder.is_dir():
        raise ElmError("tokenizer folder not found", folder)
    if not file.is_file():
        raise ElmError(f"not a fast tokenizer folder: {TOKENIZER_FILE} is missing", folder)
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ElmError("not valid JSON", file) from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ElmError("field 'model' is missing: not a tokenizers file", file)
    return obj


def tokenizer_hash(path: Path) -> str:
    """A short content hash of a tokenizer folder (16 hex digits of a sha256).

    Computed over tokenizer.json re-serialised canonically (sorted keys, no whitespace), leaving
    out the run-time `truncation`/`padding` settings and the format `version`, so the same
    vocabulary saved by a different library version or with padding switched on hashes the same.
    """
    obj = _read_tokenizer_json(Path(path))
    for key in ("truncation", "padding", "version"):
        obj.pop(key, None)
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def load_tokenizer(path: Path):
    """Load a Hugging Face fast tokenizer folder (ours or any other) as a PreTrainedTokenizerFast.

    Raises ElmError naming the folder and the file when tokenizer.json or tokenizer_config.json
    is missing or corrupt, or when the tokenizer defines no end-of-text token (documents are
    separated by it in the token caches).
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    _read_tokenizer_json(folder)
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        raise ElmError(f"not a tokenizer folder: {CONFIG_FILE} is missing", folder)
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ElmError("not valid JSON", cfg) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))  # a local folder: no hub access
    except Exception as e:  # transformers raises many kinds; the user can only fix the folder
        raise ElmError(f"cannot load the tokenizer: {type(e).__name__}: {e}", folder) from None
    if not getattr(tok, "is_fast", False):
        raise ElmError("not a fast tokenizer (tokenizers backend); elmforest needs tokenizer.json", folder)
    if tok.eos_token_id is None:
        raise ElmError(f"the tokenizer defines no eos_token; set one in {CONFIG_FILE}", folder)
    return tok


def vocab_size(tokenizer) -> int:
    """Number of token ids, added/special tokens included (what the embedding table needs)."""
    return len(tokenizer)
