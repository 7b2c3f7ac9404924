"""Interrupted and failed writes lose nothing.

- Ctrl-C (SIGINT) or SIGTERM mid-stage ends in one `hsd: interrupted:` line (status 130 or 143) with the last
  checkpoint intact, and rerunning the command ends bit for bit where an uninterrupted run ends.
- A run killed (SIGKILL) half-way through writing a checkpoint file or folder leaves a temp behind; the next run
  that owns the folder removes it (and only such temps) and still ends bit for bit where the uninterrupted run ends.
- A write that fails (no space left) at each save point (a stage checkpoint, a LoRA export, a one-step UNet folder,
  an eval table) keeps the previous file or folder loadable and says so in one line.
Every run here is a subprocess with one thread, so the three runs that are compared compute alike.
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning  # noqa: F401  imported here, not inside a test: its log handler binds the stderr of that moment
import pytest
import torch
from safetensors.torch import load_file

from hsd.cli import main

ROOT = Path(__file__).resolve().parent.parent
LAB = ["lab", "lab.world=blocks", "tscd.stages=[{k: 2, grid_steps: 8, iterations: 120}]", "tscd.batch_size=8",
       "feedback.iterations=0", "dmd.iterations=0", "trainer.progress_bar=false", "lab.eval_per_class=2",
       "lab.student_steps=[1]", "trainer.ckpt_every=5"]
ENV = {**{k: v for k, v in os.environ.items() if k != "HSD_DEBUG"}, "OMP_NUM_THREADS": "1"}
LORA = "lora_stage0_k2.safetensors"


def _hsd(out: Path, name: str, *pre: str) -> list[str]:
    return [sys.executable, *(pre or ["-m", "hsd.cli"]), *LAB, f"out_dir={out}", f"name={name}"]


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600, **kw)


def _same_lora(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".hsd-tmp-" in p.name]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    r = _run(_hsd(out, "run"))
    assert r.returncode == 0, r.stderr
    return out / "run"


@pytest.mark.parametrize("sig, status, said", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_mid_stage_then_rerun_ends_bit_identical(baseline, tmp_path, sig, status, said):
    """SIGTERM is what kill, timeout and a scheduler's preemption send; Lightning stops at the end of the batch."""
    # A background job of a non-interactive shell (as CI may run pytest) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition, as a terminal's foreground has.
    proc = subprocess.Popen(_hsd(tmp_path, "run"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = tmp_path / "run" / "stage0_k2" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    last = err.splitlines()[-1]
    assert proc.returncode == status and "Traceback" not in err, err
    assert last.startswith(f"hsd: interrupted: stage 'tscd k=2' stopped by {said} after ") and " of 120 updates" in last
    assert f"its last checkpoint {ckpt}" in last and "rerun the same command to resume from it" in last
    assert int(last.split("after ")[1].split(" of")[0]) < 120 and not (tmp_path / "run" / LORA).exists()
    assert torch.load(ckpt, weights_only=True)["global_step"] >= 5  # whole: it loads
    r = _run(_hsd(tmp_path, "run"))
    assert r.returncode == 0, r.stderr
    assert _same_lora(tmp_path / "run" / LORA, baseline / LORA) and not _temps(tmp_path)


def test_killed_mid_checkpoint_then_rerun_cleans_up_and_ends_bit_identical(baseline, tmp_path):
    killed = _run(_hsd(tmp_path, "run", str(ROOT / "tests" / "kill_mid_save.py"), "file", "3"))
    ckpts = tmp_path / "run" / "stage0_k2" / "checkpoints"
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = _temps(tmp_path)
    assert [p.parent for p in left] == [ckpts] and left[0].name.startswith(".last.ckpt.hsd-tmp-")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 10  # the 2nd save, whole
    (ckpts / "notes.txt").write_text("a file of the user's")
    (ckpts / ".last.ckpt.backup").write_text("a dot file without the temp mark")
    r = _run(_hsd(tmp_path, "run"))
    assert r.returncode == 0, r.stderr
    assert "removed 1 unfinished write(s)" in r.stderr and not _temps(tmp_path)
    assert (ckpts / "notes.txt").exists() and (ckpts / ".last.ckpt.backup").exists()  # only hsd's temps go
    assert _same_lora(tmp_path / "run" / LORA, baseline / LORA)


def test_killed_mid_folder_checkpoint_leaves_a_temp_folder_the_next_run_removes(baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ckpt = run / "stage0_k2" / "checkpoints" / "last.ckpt"
    ckpt.unlink()  # as a sharded stage's folder checkpoint would stand there
    ckpt.mkdir()
    killed = _run([sys.executable, str(ROOT / "tests" / "kill_mid_save.py"), "folder", str(ckpt)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].is_dir() and left[0].name.startswith(".last.ckpt.hsd-tmp-")
    assert (left[0] / "__0_0.distcp").exists() and ckpt.is_dir()  # the half-written shards; the old folder kept
    r = _run(_hsd(tmp_path, "run"))
    assert r.returncode == 0, r.stderr
    assert not _temps(tmp_path) and ckpt.is_dir()
    assert all(p.read_bytes() == data for p, data in before.items() if p.exists() and "lora" in p.name)


# ---- a write that fails keeps the previous one ----
def _fails_once_written(real, after_bytes=b"partial"):
    """A writer that writes a little, then fails as a full disk does."""
    def write(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(after_bytes)
        else:
            Path(f).write_bytes(after_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def _one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hsd: error: ")]
    assert exit_.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    save, calls = torch.save, []

    def third_fails(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            return _fails_once_written(save)(obj, f)
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", third_fails)
    line = _one_error_line(capsys, [*LAB, f"out_dir={tmp_path}", "name=run", "trainer.ckpt_every=1"])
    ckpt = tmp_path / "run" / "stage0_k2" / "checkpoints" / "last.ckpt"
    assert line == f"hsd: error: could not write {ckpt}: No space left on device; the previous one is kept"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2 and not _temps(tmp_path)


def test_a_failed_lora_export_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file
    lora = tmp_path / "a.safetensors"
    save_file({"unet.x.lora_A.weight": torch.ones(2, 3), "unet.x.lora_B.weight": torch.ones(3, 2)}, lora)
    main(["lora", "convert", str(lora), "--out", str(tmp_path / "b.safetensors"), "--format", "kohya"])
    before = (tmp_path / "b.safetensors").read_bytes()
    monkeypatch.setattr("hsd.models.lora_formats.save_file", _fails_once_written(None))
    line = _one_error_line(capsys, ["lora", "convert", lora, "--out", tmp_path / "b.safetensors", "--format",
                                    "kohya"])
    assert line == (f"hsd: error: could not write {tmp_path / 'b.safetensors'}: No space left on device; the "
                    f"previous one is kept")
    assert (tmp_path / "b.safetensors").read_bytes() == before and not _temps(tmp_path)


def test_a_failed_lora_export_at_the_end_of_a_stage_keeps_its_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hsd.models.lora_formats.save_file", _fails_once_written(None))
    line = _one_error_line(capsys, [*LAB, f"out_dir={tmp_path}", "name=run",
                                    "tscd.stages=[{k: 2, grid_steps: 8, iterations: 5}]"])
    assert line == (f"hsd: error: could not write {tmp_path / 'run' / LORA}: No space left on device; nothing was "
                    f"written there")
    ckpt = tmp_path / "run" / "stage0_k2" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 5 and not _temps(tmp_path)
    monkeypatch.undo()  # a rerun only exports: the stage is complete in its checkpoint
    main([*LAB, f"out_dir={tmp_path}", "name=run", "tscd.stages=[{k: 2, grid_steps: 8, iterations: 5}]"])
    assert (tmp_path / "run" / LORA).exists()


def test_a_failed_one_step_unet_write_keeps_the_previous_folder(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from hsd.io import WriteError
    from hsd.lit.sharded import save_unet
    from hsd.models.components import build_components
    unet, folder = build_components("tiny-sd15").unet, tmp_path / "unet_onestep"
    save_unet(unet, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained",
                        lambda self, path, **_: _fails_once_written(None)(None, Path(path) / "config.json"))
    with pytest.raises(WriteError, match=f"could not write {folder}: No space left on device; the previous one is "
                                         f"kept"):
        save_unet(unet, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and not _temps(tmp_path)
    UNet2DConditionModel.from_pretrained(folder)  # loadable


def test_a_failed_eval_table_write_keeps_the_previous_table(tmp_path, monkeypatch):
    from eval.table import write_tables
    from hsd.io import WriteError
    write_tables([], tmp_path, "sha", 0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if ".table.md.hsd-tmp-" in self.name:
            real(self, text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(WriteError, match=f"could not write {tmp_path / 'table.md'}: No space left on device; the "
                                         f"previous one is kept"):
        write_tables([], tmp_path, "another", 1)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_folder_moved_aside_by_a_crash_between_renames_is_kept_until_the_next_write(tmp_path):
    from hsd.io import OLD_NAME, atomic_dir, remove_stale_temps
    target, old = tmp_path / "unet", tmp_path / OLD_NAME.format("unet")
    old.mkdir()  # the whole previous folder, moved aside; the crash came before the new one was renamed in
    (old / "weights").write_text("previous")
    (tmp_path / ".unet.hsd-tmp-k2j4x9aa").mkdir()  # the new one, unfinished as far as anyone can tell
    assert remove_stale_temps(tmp_path) == [tmp_path / ".unet.hsd-tmp-k2j4x9aa"] and old.is_dir()
    with atomic_dir(target) as new:
        (new / "weights").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"] and (target / "weights").read_text() == "new"
