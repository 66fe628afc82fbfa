import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# One torch thread per process, in this process and in every process a test starts (a served model, a script):
# the same numbers on any machine, and no oversubscription when scripts/test.sh runs two workers on two cores.
# Two copies of test_training_on_digits_lowers_the_loss side by side took 121-143 s with two threads each and
# 21 s with one each, about as long as one copy alone (20-25 s) (this 2-core machine, 2026-12-02).
# Stage processes set their own (train.threads; the tests' projects use 1).
THREADS = 1
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(THREADS)
    yield


# The modules that take minutes, longest first (measured: `pytest -m slow --durations=0`, this 2-core machine).
# Under `pytest -n 2 --dist loadfile` (scripts/test.sh) a module runs whole on one worker, in collection order:
# starting the long ones first keeps one of them from running alone at the end.
LONGEST_FIRST = ("test_flows", "test_study", "test_entrypoints", "test_sweep_resume", "test_pipeline",
                 "test_distributed", "test_lifecycle", "test_elbo_mc", "test_train")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order is kept
