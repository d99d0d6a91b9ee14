"""Expert folders kept at any fsspec URL (s3://, gs://, file://, ...) between trainings.

With `launcher.storage` set, a worker that trains an expert pulls the expert's folder from
`STORAGE/<expert>` into local scratch space, trains there, pushes the folder back every
`sync_seconds` and at the end, and the driver pulls the finished folder home. A retry on any
node therefore resumes from the last pushed checkpoint. Each file is uploaded under a temporary
name and then moved into place, so a reader never sees half a file. The corpus and the
tokenizer are still read from their recorded paths, which must exist on every node.

A push is file by file, so a worker killed in the middle of one leaves the URL holding some
files of the new state and some of the old. The upload order keeps that resumable:

- `train_state.pt` first: it holds the weights, optimizer, sampler and RNG states, a resume
  point on its own; metrics.jsonl, uploaded after it, then has every line up to its step.
- the other files oldest first (by modification time when the push starts), so a file written
  as a consequence of others (model.safetensors after train_state.pt, train.json's "done" after
  the final weights, expert.json last of all) never arrives before them. `training.train` also
  checks that a "done" train.json names the weights beside it before trusting it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from elmforest.errors import ElmError

PARTIAL = ".partial"


def _fs(url: str):
    try:
        import fsspec
    except ImportError:
        raise ElmError("launcher.storage needs fsspec: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ElmError(f"launcher.storage {url!r}: {e}") from None


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


RESUME_POINT = "train_state.pt"


def upload_order(local: str | Path) -> list[Path]:
    """The files of `local` to upload (not hidden temporaries), in the order described above."""
    local = Path(local)
    files = []
    for path in local.rglob("*"):
        rel = path.relative_to(local)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            if path.is_file():
                files.append((path.name != RESUME_POINT, path.stat().st_mtime_ns, rel.as_posix(), path))
        except FileNotFoundError:  # replaced (atomically) while we looked; the next push has it
            continue
    return [path for *_, path in sorted(files)]


def push(local: str | Path, url: str) -> int:
    """Upload every file of `local` (not hidden temporaries) to `url`; returns the file count."""
    fs, root = _fs(url)
    local = Path(local)
    count = 0
    for path in upload_order(local):
        rel = path.relative_to(local)
        target = f"{root.rstrip('/')}/{rel.as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), target + PARTIAL)
        fs.mv(target + PARTIAL, target)
        count += 1
    return count


def pull(url: str, local: str | Path) -> int:
    """Download every file under `url` into `local` (each replaced atomically); returns the count."""
    fs, root = _fs(url)
    local = Path(local)
    if not fs.exists(root):
        return 0
    root = root.rstrip("/")
    count = 0
    for remote in sorted(fs.find(root)):
        rel = remote[len(root) + 1 :]
        if not rel or rel.endswith(PARTIAL):
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            fs.get_file(remote, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        count += 1
    return count


class Pusher:
    """Push a folder to a URL every `seconds` in a background thread, and once more at `stop()`."""

    def __init__(self, local: str | Path, url: str, seconds: float):
        self.local, self.url, self.seconds = Path(local), url, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                push(self.local, self.url)
            except Exception:  # a failed periodic push is retried next time; the final one raises
                pass

    def __enter__(self) -> "Pusher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        push(self.local, self.url)


def scratch_dir(name: str) -> Path:
    """A fresh local folder for one attempt at one expert."""
    return Path(tempfile.mkdtemp(prefix=f"elmforest-{name}-"))


def drop_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
