"""`python -m flows.exp_one [--wait-for-lock] exp run --temp [DVC's options]`: DVC's own command, made to run
exactly the experiment this process queued.

Why: `dvc exp run --temp` puts its experiment on DVC's temporary queue, a stash ref that every process in the
checkout shares, and then runs queue entries until the queue is empty. Two such processes side by side pop
each other's entries: a point ran twice (a tiny study at --concurrency 2 logged 17 MLflow runs for 16
points) and, worse, under the other process's environment (its CUDA_VISIBLE_DEVICES). Here the temporary
queue hands this process only the entry it put there, once, by its stash revision; everything else is DVC's
code path (dvc 3.67.1: TempDirQueue.put / get, checked by tests/test_exp_queue.py).

A killed experiment leaves its temporary copy of the project (about the size of build/) under
.dvc/tmp/exps/standalone/, and DVC cannot tell a dead run's copy from a live one. Here the process that runs a
copy holds a lock on a file beside it (COPY.owner) until it ends, however it ends; the next experiment started
here removes every copy whose lock nobody holds. A copy without an owner file (plain `dvc exp run --temp`) is
left alone.
"""

from __future__ import annotations

import atexit
from contextlib import suppress
import fcntl
import os
from pathlib import Path
import shutil
import sys
import tempfile

from pipeline.checkpoints import size_text

OWNER = ".owner"


def own(copy: str) -> None:
    """Lock COPY.owner for as long as this process lives (the kernel drops the lock when it dies, even by
    kill -9). The file is locked before it appears under its name, so no one can take a live copy for dead."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(copy), prefix=".owner-")
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(tmp, copy + OWNER)

    def release() -> None:  # a finished run: DVC removed the copy; a copy still there is left to the next run
        if not os.path.exists(copy):
            with suppress(FileNotFoundError):
                os.unlink(copy + OWNER)

    atexit.register(release)


def remove_dead(folder: str | Path) -> list[tuple[Path, int]]:
    """Remove the copies in `folder` whose owner is gone; (copy, bytes) for each removed."""
    removed = []
    for owner in sorted(Path(folder).glob("*" + OWNER)):
        try:
            fd = os.open(owner, os.O_RDONLY)
        except FileNotFoundError:
            continue  # another process removed it just now
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process runs
            copy = owner.with_name(owner.name[:-len(OWNER)])
            size = sum(f.stat().st_size for f in copy.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(copy, ignore_errors=True)
            with suppress(FileNotFoundError):
                owner.unlink()
            if size:
                removed.append((copy, size))
        finally:
            os.close(fd)
    return removed


def own_entries_only() -> None:
    """Patch DVC's temporary queue: `get` returns this process's own queued entry, then reports empty."""
    from dvc.exceptions import DvcException
    from dvc.repo.experiments.exceptions import ExpQueueEmptyError
    from dvc.repo.experiments.executor.local import TempDirExecutor
    from dvc.repo.experiments.queue.base import QueueGetResult
    from dvc.repo.experiments.queue.tempdir import TempDirQueue

    mine: list = []
    put = TempDirQueue.put

    def put_own(self, *args, **kwargs):
        entry = put(self, *args, **kwargs)
        mine.append(entry)
        return entry

    def get_own(self) -> QueueGetResult:
        if not mine:
            raise ExpQueueEmptyError("this process has no queued experiment left")
        entry = mine.pop(0)
        if entry.stash_rev not in self.stash.stash_revs:
            raise DvcException(f"queued experiment {entry.name or entry.stash_rev[:7]} was taken from DVC's "
                               f"temporary queue by another process")
        for copy, size in remove_dead(self._standalone_tmp_dir):
            print(f"removed {os.path.relpath(copy)} ({size_text(size)}), the temporary copy of a killed experiment",
                  file=sys.stderr)
        executor = self.init_executor(self.repo.experiments, entry, TempDirExecutor, wdir=self._standalone_tmp_dir)
        own(executor.root_dir)
        return QueueGetResult(entry, executor)

    TempDirQueue.put, TempDirQueue.get = put_own, get_own


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--temp" not in argv or "run" not in argv:
        print("usage: python -m flows.exp_one [--wait-for-lock] exp run --temp [options]", file=sys.stderr)
        return 2
    from dvc.cli import main as dvc_main

    own_entries_only()
    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main())
