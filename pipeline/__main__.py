"""`python -m pipeline STAGE`: check | prepare | featurizer | train | sample | figures | evaluate;
`python -m pipeline checkpoints`: the scratch checkpoints of killed trainings (pipeline/checkpoints.py).

Every stage validates params.yaml first; an expected failure prints one line and exits with status 2.
"""

from __future__ import annotations

import os
import sys

STAGES = ("check", "prepare", "featurizer", "train", "sample", "figures", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(key, value)
    if argv[:1] == ["checkpoints"]:
        from .checkpoints import main as checkpoints

        return checkpoints(argv[1:])
    if len(argv) != 1 or argv[0] not in STAGES:
        print(f"usage: python -m pipeline {{{'|'.join(STAGES)}}} | checkpoints [--remove NAME ... | --remove-all]",
              file=sys.stderr)
        return 2
    from ddpm_core.checkpoint import CheckpointError
    from ddpm_core.compute import ComputeError
    from ddpm_core.data import DataError
    from ddpm_core.schedules import ScheduleError
    from ddpm_core.train import NonFiniteLossError

    from . import figures, paths, stages
    from .params import ParamsError, load_params
    from .tracking import TrackingError

    expected = (ParamsError, DataError, ScheduleError, CheckpointError, NonFiniteLossError, TrackingError,
                ComputeError, stages.LaunchError)
    try:
        params = load_params()
        if argv[0] == "check":
            stages.check_compute(params)  # bf16 where it is not native, cuda without GPUs: refused here
            paths.BUILD.mkdir(exist_ok=True)
            (paths.BUILD / "params.ok").write_text("params.yaml is valid\n")
            print("check: params.yaml is valid")
        else:
            getattr(figures if argv[0] == "figures" else stages, argv[0])(params)
    except expected as e:
        once = os.environ.get("RANK", "0") == "0" or isinstance(e, ComputeError)  # torchrun's ranks: once
        if once and not getattr(e, "reported", False):
            print(f"error: {argv[0]}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
