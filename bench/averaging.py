"""Parameter averaging: time and peak memory of elmforest against mergekit's `linear` method.

n experts (n = 2, 6, 16) of a GPT-2 model (8 layers, width 512, vocab 8192: ~30M parameters,
~120 MB of float32 safetensors each) are saved with `save_pretrained(safe_serialization=True)`,
then averaged uniformly into one model by

    elmforest  elmforest.combine.averaging.average_folders(dirs, None, "uniform", out)   (streams tensor
               by tensor: one output model in memory plus one tensor per expert)
    mergekit   mergekit-yaml with merge_method: linear, weight 1/n each, dtype float32
               (installed into its own venv at bench/.env on first use)

each in its own subprocess, so the peak resident memory (ru_maxrss from os.wait4 on that child)
belongs to that run alone (this process imports no torch, so children start small); "imports
alone" is the same interpreter importing the method's modules and exiting, the floor under each figure. Wall time includes the interpreter start and
imports, as a user running the command sees it. The two outputs are compared tensor by tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

BENCH = Path(__file__).resolve().parent
MERGEKIT_ENV = BENCH / ".env"
MERGEKIT_BIN = MERGEKIT_ENV / "bin" / "mergekit-yaml"
CONSTRAINTS = BENCH.parent / "constraints.txt"

ELMFOREST_CHILD = """
import sys
from elmforest.combine.averaging import average_folders
if sys.argv[1] != "imports-only":
    average_folders(sys.argv[2:], None, "uniform", sys.argv[1])
"""


def ensure_mergekit() -> str | None:
    """Create bench/.env with mergekit (torch held by constraints.txt); None if ready, else why not."""
    if MERGEKIT_BIN.exists():
        return None
    print(f"installing mergekit into {MERGEKIT_ENV} (first use; a few minutes)...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_ENV)], check=True)
        subprocess.run(
            [str(MERGEKIT_ENV / "bin" / "pip"), "install", "-q", "-c", str(CONSTRAINTS), "mergekit"],
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        return f"mergekit comparison skipped: installing mergekit into {MERGEKIT_ENV} failed ({e})"
    return None if MERGEKIT_BIN.exists() else f"mergekit comparison skipped: {MERGEKIT_BIN} missing after install"


def rss_anon_mb(pid: int) -> float:
    """The process's resident anonymous memory now (RssAnon: heap, tensors; not mapped files), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run cmd as a child -> (wall seconds, peak RSS MB, peak anonymous RSS MB); raises if it fails.

    Peak RSS is the child's own ru_maxrss (os.wait4); it counts the pages of memory-mapped files
    (safetensors are read through mmap), which the kernel can drop at will. The anonymous part
    (allocated memory) is sampled from /proc every 2 ms while the child runs.
    """
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        anon = 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's own rusage
            if pid:
                break
            anon = max(anon, rss_anon_mb(proc.pid))
            time.sleep(0.002)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {err.read().decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, anon  # Linux reports ru_maxrss in KB


def mergekit_config(dirs: list[Path], path: Path) -> None:
    """A mergekit linear-merge config: equal weights, float32 (written by hand: no yaml dependency)."""
    lines = ["merge_method: linear", "dtype: float32", "models:"]
    for d in dirs:
        lines += [f"  - model: {d}", "    parameters:", f"      weight: {1.0 / len(dirs)!r}"]
    path.write_text("\n".join(lines) + "\n")


def load_tensors(folder: Path) -> dict:
    """Every tensor in a folder's *.safetensors files (mergekit may shard its output)."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a: Path, b: Path) -> str:
    import torch

    ta, tb = load_tensors(a), load_tensors(b)
    common = sorted(set(ta) & set(tb))
    only = sorted(set(ta) ^ set(tb))
    diff = max((float((ta[k].float() - tb[k].float()).abs().max()) for k in common), default=float("nan"))
    same = all(torch.equal(ta[k], tb[k]) for k in common)
    extra = f"; keys in one output only: {', '.join(only)}" if only else ""
    return f"{len(common)} tensors compared, max |diff| {diff:.3g}, bit-identical: {'yes' if same else 'no'}{extra}"


def make_experts(out: Path, n: int, layers: int, width: int, vocab: int, ctx: int) -> None:
    """Child: save n random-init GPT-2 experts with save_pretrained; print their size as JSON."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = GPT2Config(
        vocab_size=vocab, n_positions=ctx, n_embd=width, n_layer=layers, n_head=8, n_inner=4 * width,
        bos_token_id=None, eos_token_id=None,
    )
    for i in range(n):
        torch.manual_seed(i)
        model = GPT2LMHeadModel(config)
        model.save_pretrained(out / f"expert{i:02d}", safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    model_mb = sum(f.stat().st_size for f in (out / "expert00").glob("*.safetensors")) / 2**20
    print(json.dumps({"n_params": n_params, "model_mb": model_mb}))


def main() -> None:
    if sys.argv[1:2] == ["--child-make"]:
        out, *numbers = sys.argv[2:]
        return make_experts(Path(out), *map(int, numbers))
    if sys.argv[1:2] == ["--child-compare"]:
        return print(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    p = record.parser(__doc__.splitlines()[0])
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    a = p.parse_args()

    if a.quick:
        counts, layers, width, vocab, ctx = [2, 3], 2, 64, 512, 64
    else:
        counts, layers, width, vocab, ctx = [2, 6, 16], 8, 512, 8192, 512
    repeats = a.repeats or (1 if a.quick else 2)
    skip = "mergekit comparison skipped (--quick or --no-mergekit)" if (a.quick or a.no_mergekit) else ensure_mergekit()

    tmp = Path(tempfile.mkdtemp(prefix="elmforest-bench-avg-"))
    try:
        # Experts are made in a child: this process stays small (no torch imported), since a
        # child's ru_maxrss starts from its parent's resident size at fork.
        made = subprocess.run(
            [sys.executable, __file__, "--child-make", str(tmp), *map(str, (max(counts), layers, width, vocab, ctx))],
            check=True, capture_output=True, text=True,
        )
        info = json.loads(made.stdout.strip().splitlines()[-1])
        n_params, model_mb = info["n_params"], info["model_mb"]
        dirs = [tmp / f"expert{i:02d}" for i in range(max(counts))]

        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
        runs = iter(range(10**9))
        outputs: dict[tuple[str, int], Path] = {}

        def run(name: str, n: int) -> tuple[float, float]:
            out = tmp / f"out-{name}-{n}-{next(runs)}"
            if name == "elmforest":
                cmd = [sys.executable, "-c", ELMFOREST_CHILD, str(out), *map(str, dirs[:n])]
            else:
                cfg = tmp / f"merge-{n}.yml"
                mergekit_config(dirs[:n], cfg)
                cmd = [str(MERGEKIT_BIN), str(cfg), str(out), "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"]
            result = measured(cmd, env)
            if (name, n) in outputs:
                shutil.rmtree(out)
            else:
                outputs[(name, n)] = out
            return result

        contenders = ["elmforest"] + ([] if skip else ["mergekit"])
        floor = {"elmforest": measured([sys.executable, "-c", ELMFOREST_CHILD, "imports-only"], env)}
        if not skip:
            floor["mergekit"] = measured([str(MERGEKIT_ENV / "bin" / "python"), "-c", "import mergekit.merge, mergekit.config"], env)
        rows, checks = [], []
        for n in counts:
            results = record.interleaved(contenders, repeats, lambda c: run(c, n))
            for c in contenders:
                secs = [r[0] for r in results[c]]
                rss = max(r[1] for r in results[c])
                anon = max(r[2] for r in results[c])
                rows.append([c, n, f"{record.median(secs):.2f}", record.spread(secs, "{:.2f}"), f"{rss:,.0f}",
                             f"{(rss - floor[c][1]) / model_mb:.1f}", f"{anon:,.0f}", f"{(anon - floor[c][2]) / model_mb:.1f}"])
            if not skip:
                pair = [str(outputs[("elmforest", n)]), str(outputs[("mergekit", n)])]
                cmp = subprocess.run([sys.executable, __file__, "--child-compare", *pair], check=True, capture_output=True, text=True)
                checks.append(f"n={n}: elmforest vs mergekit: {cmp.stdout.strip().splitlines()[-1]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = record.markdown_table(
        ["method", "experts n", "seconds (median)", "range", "peak RSS MB", "RSS above imports / one model",
         "peak anon MB", "anon above imports / one model"], rows
    )
    notes = [
        f"One model: {n_params:,} parameters, {model_mb:,.0f} MB of safetensors. 'above imports': minus the "
        f"same interpreter importing the method's modules and exiting ("
        + ", ".join(f"{c}: RSS {floor[c][1]:,.0f} MB, anon {floor[c][2]:,.0f} MB, {floor[c][0]:.2f} s" for c in floor) + ").",
        "Peak RSS includes the pages of the memory-mapped expert files that were read (file-backed, "
        "reclaimable); peak anon is allocated memory only (sampled every 2 ms, so a lower bound).",
        *checks,
    ]
    if skip:
        notes.append(skip)
    settings = (
        f"GPT-2 {layers} layers, width {width}, vocab {vocab}; uniform average; each run a fresh subprocess "
        f"(wall time includes interpreter start and imports); {repeats} interleaved repeats"
    )
    record.emit("averaging", settings, table, notes, a.quick)


if __name__ == "__main__":
    main()
