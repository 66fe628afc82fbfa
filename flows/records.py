"""Point records: a finished study point's results, committed with the study's reports (reports/studies/NAME/points/)
so that a fresh clone reuses the point instead of computing it again.

A study runs for many hours; its points are DVC experiments, which live in the checkout (Git refs and the DVC
cache) and go with it. A record keeps what the study's report reads of a point: its metrics, its per-image
bits/dim (and t = T terms), its bits/dim per t, its FID-proxy features and the first images of its sample sheet.
It is reused only where the code that computes a point is the code checked out: the Git trees of CODE_PATHS,
committed, equal to those the point ran with; else the point runs again and its record is replaced.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from .points import (LAST_TERM_KEYS, METRIC_KEYS, Point, PointResult, dvc_cmd, git, read_exp_file, repro_shared,
                     run_logged)
from pipeline.params import ParamsError

CODE_PATHS = ("ddpm_core", "pipeline", "dvc.yaml", "params.yaml", "requirements.txt")
SHEET_IMAGES = 36          # what a sample sheet shows of a point (flows/study_report.py)
IGNORED = ("train.threads",)  # a point's threads (set by --concurrency) do not make it another point


def code_id(root: Path) -> str | None:
    """One hash of the committed trees of CODE_PATHS; None when any of them has uncommitted changes (a point
    computed then cannot say which code made it)."""
    if git(root, "status", "--porcelain", "--", *CODE_PATHS):
        return None
    trees = git(root, "ls-tree", "HEAD", "--", *CODE_PATHS)  # "mode type hash<TAB>path" of those that exist
    return hashlib.sha256(trees.encode()).hexdigest()[:20]


def _settings(point: Point) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in point.settings().items() if k not in IGNORED}, sort_keys=True))


def _dir(out: Path, result: PointResult) -> Path:
    return out / "points" / result.exp_name


def write(root: Path, out: Path, point: Point, result: PointResult, code: str, seconds: float | None) -> Path:
    """The record of a finished point read from its experiment (result.exp_rev), in out/points/EXP_NAME/, with
    the experiment's whole reports/metrics.json (devices, precision, versions, stage times). `seconds`: the
    point's wall time when it was computed (None: not known). The test and train features every point shares
    are written once, in a file named by their hash."""
    where = _dir(out, result)
    where.mkdir(parents=True, exist_ok=True)
    ref = np.concatenate([result.fid_features["test"], result.fid_features["train"]]).astype(np.float32)
    ref_name = f"reference-{hashlib.sha256(ref.tobytes()).hexdigest()[:12]}.npz"
    if not (out / "points" / ref_name).exists():  # written whole or not at all: every record reads it
        part = out / "points" / (ref_name + ".part")
        with open(part, "wb") as f:
            np.savez_compressed(f, test=result.fid_features["test"].astype(np.float32),
                                train=result.fid_features["train"].astype(np.float32))
        part.rename(out / "points" / ref_name)
    with np.load(io.BytesIO(read_exp_file(root, result.exp_rev, "build/samples.npz", binary=True))) as z:
        sheet = z["images"][:SHEET_IMAGES]
    np.savez_compressed(where / "arrays.npz", gen=result.fid_features["gen"].astype(np.float32), sheet=sheet)
    for name in ("bpd_per_t.csv", "metrics.json"):
        (where / name).write_text(read_exp_file(root, result.exp_rev, f"reports/{name}"))
    with open(where / "bpd_per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "bpd", "last_term"])
        for image, bpd in result.bpd_per_image.items():
            last = result.last_term_per_image.get(image)
            w.writerow([image, repr(float(bpd)), "" if last is None else repr(float(last))])  # repr: exact
    featurizer = keep_featurizer(root, out, result.exp_rev)
    record = {"exp_name": result.exp_name, "axes": [[k, v] for k, v in result.axes.items()],
              "settings": _settings(point), "code": code, "commit": git(root, "rev-parse", "HEAD"),
              "exp_rev": result.exp_rev, "mlflow_run_id": result.mlflow_run_id, "metrics": result.metrics,
              "seconds": None if seconds is None else round(seconds, 1), "reference": ref_name,
              "featurizer": featurizer}
    (where / "record.json").write_text(json.dumps(record, indent=1) + "\n")  # last: a record without it is none
    return where


def keep_featurizer(root: Path, out: Path, rev: str) -> str:
    """The md5 of the FID-proxy featurizer the point was measured with (its experiment's dvc.lock), whose weights
    are kept once in out/points/featurizer-MD5/featurizer.pt: the instrument every recorded FID-proxy value
    depends on. A featurizer trained again on another CPU need not be bit-identical, and features of two
    featurizers are not comparable; with the weights kept, that is checkable and the instrument restorable."""
    import yaml

    lock = yaml.safe_load(git(root, "show", f"{rev}:dvc.lock"))
    path = "build/featurizer.pt"  # its accuracy (featurizer.json, not cached) is in metrics.json
    md5 = next(o["md5"] for o in lock["stages"]["featurizer"]["outs"] if o["path"] == path)
    kept = out / "points" / f"featurizer-{md5}" / "featurizer.pt"
    if not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        part = kept.with_suffix(".part")
        part.write_bytes(read_exp_file(root, rev, path, binary=True))
        part.rename(kept)
    return md5


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _newest_in_run_cache(root: Path, md5: str) -> None:
    """Make the featurizer stage's run-cache entries that give featurizer `md5` its newest: DVC restores a stage
    from the newest entry of its key (dvc/stage/cache.py), and a point's experiment whose featurizer stage looks
    changed (e.g. dvc.lock not committed) would otherwise get one this machine trained."""
    import yaml

    cache = subprocess.run(dvc_cmd("cache", "dir"), cwd=root, capture_output=True, text=True)
    if cache.returncode != 0:
        raise ParamsError(f"dvc cache dir failed: {(cache.stderr.strip().splitlines() or ['?'])[-1]}")
    now = time.time()
    for entry in (Path(cache.stdout.strip()) / "runs").glob("*/*/*"):
        try:
            text = entry.read_text()
            lock = yaml.safe_load(text) if "python -m pipeline featurizer" in text else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(lock, dict) and lock.get("cmd") == "python -m pipeline featurizer" and any(
                o.get("path") == "build/featurizer.pt" and o.get("md5") == md5 for o in lock.get("outs") or []):
            os.utime(entry, (now, now))


def pin_featurizer(root: Path, out: Path, log: Path) -> str | None:
    """Before points are computed beside recorded ones: this checkout's FID-proxy featurizer made the one the
    study's records were measured with, kept in out/points/featurizer-MD5/. Another machine (core count, CPU
    kernels) trains another featurizer from the same data and seed, and FID-proxy values of two featurizers do
    not compare; so where `dvc repro featurizer` would give another, the kept weights are put in build/, its
    featurizer.json is written from them (`python -m pipeline featurizer` reuses weights that match the data and
    config) and `dvc commit -f featurizer` records them in dvc.lock, from where every point's experiment
    restores them. Output of the commands in `log`. Returns what was done (None: nothing to do). ParamsError
    when the records hold several featurizers, the kept weights are damaged, or they do not fit this data."""
    kept = sorted(p for p in (out / "points").glob("featurizer-*") if p.is_dir())
    if not kept:
        return None
    if len(kept) > 1:
        raise ParamsError(f"the study's records were measured with {len(kept)} FID-proxy featurizers "
                          f"({', '.join(p.name for p in kept)} in {out / 'points'}): their values do not compare")
    md5, weights = kept[0].name.removeprefix("featurizer-"), kept[0] / "featurizer.pt"
    if not weights.is_file() or _md5(weights) != md5:
        raise ParamsError(f"{weights} is missing or damaged (its md5 is not {md5}): the featurizer the study's "
                          "records were measured with cannot be restored")
    if repro_shared(root, log, "prepare") != 0:  # the data (and params check) the featurizer stage reads
        raise ParamsError(f"dvc repro prepare failed (see {log})")
    here = root / "build" / "featurizer.pt"
    before = _md5(here) if here.is_file() else None
    said = None
    if before != md5:
        here.unlink(missing_ok=True)  # never write through a link into DVC's cache
        shutil.copyfile(weights, here)
        for cmd in ([sys.executable, "-m", "pipeline", "featurizer"], dvc_cmd("commit", "-f", "featurizer")):
            if run_logged(root, log, cmd) != 0:
                raise ParamsError(f"restoring the study's featurizer failed: {' '.join(cmd[1:])} (see {log})")
        said = (f"FID-proxy featurizer {md5} restored from {kept[0]} (this checkout had "
                f"{before or 'none'}): the points computed here are measured with the records' instrument")
    _newest_in_run_cache(root, md5)
    if repro_shared(root, log, "featurizer") != 0:
        raise ParamsError(f"dvc repro featurizer failed (see {log})")
    if (now := _md5(here)) != md5:
        raise ParamsError(f"this checkout's FID-proxy featurizer (md5 {now}) is not the one the study's records "
                          f"were measured with ({md5}): were they measured on other data? (see {log})")
    return said


def read(out: Path, point: Point, name: str, code: str | None) -> PointResult | None:
    """The point's result from its record, when there is one made with this code and these settings. ParamsError
    when the record's reference features (a file every record of a study shares) are missing."""
    where = out / "points" / point.exp_name(name)
    try:
        record = json.loads((where / "record.json").read_text())
    except (OSError, ValueError):
        return None
    if code is None or record.get("code") != code or record.get("settings") != _settings(point):
        return None
    if not (reference := out / "points" / record["reference"]).is_file():  # never computed again in silence
        raise ParamsError(f"the record {where.name} names reference features {reference.name}, missing from "
                          f"{reference.parent}: copy that file with the records")
    with open(where / "bpd_per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with np.load(where / "arrays.npz") as z, np.load(reference) as ref:
        features = {"gen": z["gen"].astype(np.float64), "test": ref["test"].astype(np.float64),
                    "train": ref["train"].astype(np.float64)}
    metrics = {k: v for k, v in record["metrics"].items() if k in (*METRIC_KEYS, *LAST_TERM_KEYS)}
    return PointResult(dict(point.axes), "ok", record["exp_name"], metrics, 0.0, True, "", "",
                       bpd_per_image={int(r["image"]): float(r["bpd"]) for r in rows},
                       last_term_per_image={int(r["image"]): float(r["last_term"]) for r in rows if r["last_term"]},
                       fid_features=features, record=str(where))


def log_seconds(log: Path) -> float | None:
    """A point's wall time from its log (flows/sweep.py): from its last `$ dvc ... exp run` line, which ends with
    the time it started, to the log's last write; None without a log."""
    try:
        starts = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("$ dvc ")]
        started = time.mktime(time.strptime(starts[-1].rsplit("# ", 1)[1].strip(), "%Y-%m-%d %H:%M:%S"))
    except (OSError, IndexError, ValueError):
        return None
    return log.stat().st_mtime - started


def bpd_per_t(root: Path, result: PointResult) -> str:
    """The point's reports/bpd_per_t.csv, from its experiment or its record."""
    if result.record:
        return (Path(result.record) / "bpd_per_t.csv").read_text()
    return read_exp_file(root, result.exp_rev, "reports/bpd_per_t.csv")


def sheet_images(root: Path, result: PointResult) -> np.ndarray:
    """The first SHEET_IMAGES of the point's samples (uint8, [n, C, H, W]), from its experiment or its record."""
    if result.record:
        with np.load(Path(result.record) / "arrays.npz") as z:
            return z["sheet"]
    with np.load(io.BytesIO(read_exp_file(root, result.exp_rev, "build/samples.npz", binary=True))) as z:
        return z["images"][:SHEET_IMAGES]
