"""Checkpoints: atomic, tagged, and never unpickled into code."""

import os
import pickle

import pytest
import torch

from ddpm_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_and_atomic_replace(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3), "meta": {"a": [1, 2]}}, path)
    save_checkpoint({"step": 2, "w": torch.zeros(3), "meta": {}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 2 and torch.equal(ckpt["w"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1}, path)
    with pytest.raises(Exception):
        save_checkpoint({"step": 2, "bad": lambda: 0}, path)  # not serialisable
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_code_in_a_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "ddpm_core.checkpoint", "x": Exploit()}, f)
    with pytest.raises(CheckpointError, match="refused by weights_only"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_foreign_files_are_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ddpm_core checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("as_torch_reports_it", [False, True])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch, as_torch_reports_it):
    """The write of a new checkpoint fails half-way (ENOSPC, raised as an OSError, or, as torch's zip writer
    does on a real full disk, as a RuntimeError while handling it): one CheckpointError line, the old one still
    loads, and no temporary file is left."""
    import errno

    from ddpm_core import checkpoint

    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = checkpoint.torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        f.truncate(7)  # half a file on disk, then the device is full
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            if as_torch_reports_it:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1122304 vs 1122192")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert str(err.value) == f"could not write the checkpoint {path} (No space left on device); the previous " \
                             f"checkpoint is kept"
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_flipped_bit_in_the_weights_is_found_on_load(tmp_path):
    """torch's zip reader does not check CRCs: a bit flipped inside a tensor's bytes would load as other weights.
    The digest written with the contents finds it; an intact file and an old one without a digest load."""
    path = tmp_path / "c.pt"
    w = torch.ones(4096)
    save_checkpoint({"step": 3, "w": w, "meta": {"a": [1, 2]}}, path)
    data = bytearray(path.read_bytes())
    at = data.find(b"\x00\x00\x80\x3f" * 512)  # inside the stored float32 ones
    assert at > 0
    data[at + 1001] ^= 0x04
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    assert not torch.equal(torch.load(damaged, weights_only=True)["w"], w)  # torch alone loads other weights
    with pytest.raises(CheckpointError, match=r"damaged.pt is damaged: its contents do not match the sha256"):
        load_checkpoint(damaged)
    assert load_checkpoint(path)["step"] == 3 and "digest" not in load_checkpoint(path)
    torch.save({"format": "ddpm_core.checkpoint", "version": 1, "step": 4}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 4
