"""`python -m flows.exp_one [--wait-for-lock] exp run --temp [DVC's options]`: DVC's own command, made to run
exactly the experiment this process queued.

Why: `dvc exp run --temp` puts its experiment on DVC's temporary queue, a stash ref that every process in the
checkout shares, and then runs queue entries until the queue is empty. Two such processes side by side pop
each other's entries: a point ran twice (a tiny study at --concurrency 2 logged 17 MLflow runs for 16
points) and, worse, under the other process's environment (its CUDA_VISIBLE_DEVICES). Here the temporary
queue hands this process only the entry it put there, once, by its stash revision; everything else is DVC's
code path (dvc 3.67.1: TempDirQueue.put / get, checked by tests/test_exp_queue.py).
"""

from __future__ import annotations

import sys


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
        executor = self.init_executor(self.repo.experiments, entry, TempDirExecutor, wdir=self._standalone_tmp_dir)
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
