"""One run at a time in an output_dir (`runlock.RunLock`): two runs started into one folder replaced each other's
checkpoints, prepared head and measurements without an error (the reliability review's repro: run B started and
finished while run A was at update 1; A then replaced B's files)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import TinyImages, make_config, tiny_timm
from transformers import TrainerCallback

from headprep_hf import HeadPrepTrainer, runlock
from headprep_hf.runlock import LOCK_NAME, OutputDirInUse, RunLock


class StartAnotherRun(TrainerCallback):
    """At update 1 of run A, start run B into the same output_dir (what two launches at once do)."""

    def __init__(self, make_other):
        self.make_other, self.error = make_other, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and self.error is None:
            other = self.make_other()
            try:
                other.train()
            except OutputDirInUse as error:
                self.error = error
            self.files_seen = sorted(os.listdir(args.output_dir))


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_finishes(tmp_path):
    settings = dict(hp_epochs=1, num_train_epochs=1, save_strategy="steps", save_steps=2)
    second = StartAnotherRun(
        lambda: HeadPrepTrainer(
            model=tiny_timm(), args=make_config(tmp_path, **settings, learning_rate=1e-2), train_dataset=TinyImages(48)
        )  # fmt: skip
    )
    first = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path, **settings), train_dataset=TinyImages(48),
                            callbacks=[second])  # fmt: skip
    first.train()
    message = str(second.error)
    assert "is in use by another run (HeadPrepTrainer.train(), process" in message and str(os.getpid()) in message
    assert f"delete {tmp_path / 'out' / LOCK_NAME}" in message
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released at the end of the run
    reference = HeadPrepTrainer(model=tiny_timm(), args=make_config(tmp_path / "ref", **settings),
                                train_dataset=TinyImages(48))  # fmt: skip
    reference.train()
    assert first.dynamics["energy"] == reference.dynamics["energy"]  # (the refused run changed nothing of the first)
    # a later run into the folder is refused for its results (not for the lock), as before
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run"):
        HeadPrepTrainer(
            model=tiny_timm(), args=make_config(tmp_path, **settings), train_dataset=TinyImages(48)
        ).train()
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # (a refused run releases it too)


def test_plain_runs_take_no_lock_as_trainer(tmp_path):
    seen = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["lock"] = os.path.exists(os.path.join(args.output_dir, LOCK_NAME))

    args = make_config(tmp_path, hp_epochs=0, num_train_epochs=1)
    HeadPrepTrainer(model=tiny_timm(), args=args, train_dataset=TinyImages(16), callbacks=[Look()]).train()
    assert seen == {"lock": False}


def test_a_second_sweep_into_a_folder_in_use_is_refused_and_the_first_finishes(tmp_path):
    """Two sweeps started at once into one folder (another grid, or two shards given the same output_dir) both passed
    the owner check, before either had written a file, and then wrote over each other's snapshots and sweep.json.
    The sweep now holds the folder's lock from before that check to its last file: the second is refused at once,
    and the first finishes as if alone."""
    from conftest import CONFIG_DEFAULTS

    from headprep_hf import SweepConfig, TauSweep
    from headprep_hf.metrics import accuracy_metrics

    folder = tmp_path / "sweep"

    def sweep(taus, callbacks=()):
        values = {k: v for k, v in CONFIG_DEFAULTS.items() if k != "hp_epochs"}
        args = SweepConfig(**{**values, "output_dir": str(folder), "sweep_taus": taus, "sweep_progress": False})
        kwargs = {"callbacks": list(callbacks)} if callbacks else {}
        return TauSweep(tiny_timm(), args, TinyImages(24), TinyImages(12, seed=1), None,
                        compute_metrics=accuracy_metrics(), **kwargs)  # fmt: skip

    class StartAnotherSweep(TrainerCallback):
        error = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.error is None:
                try:
                    sweep([0, 1]).run()
                except OutputDirInUse as error:
                    self.error = error

    second = StartAnotherSweep()
    result = sweep([0, 2], [second]).run()
    assert "is in use by another run (TauSweep.run(), process" in str(second.error)
    assert [r["tau"] for r in result["results"]] == [0, 2] and not (folder / LOCK_NAME).exists()
    assert json.loads((folder / "sweep.json").read_text())["taus"] == [0, 2]
    # a folder whose lock another live process holds is refused before anything is written
    _write_lock(folder / "held")
    with pytest.raises(OutputDirInUse, match="in use by another run"):
        TauSweep(tiny_timm(), dataclasses.replace(sweep([0]).args, output_dir=str(folder / "held")),
                 TinyImages(24), TinyImages(12, seed=1), compute_metrics=accuracy_metrics()).run()  # fmt: skip
    assert os.listdir(folder / "held") == [LOCK_NAME]


def _write_lock(folder, **fields):
    os.makedirs(folder, exist_ok=True)
    record = {"what": "a run", "host": socket.gethostname(), "boot_id": runlock._boot_id(), "pid": os.getpid(),
              "pid_namespace": runlock._pid_namespace(),
              "process_start": runlock._process_start(os.getpid()), "since": "then", "token": "theirs"}  # fmt: skip
    record.update(fields)
    with open(os.path.join(folder, LOCK_NAME), "w") as f:
        json.dump(record, f)


def test_the_lock_of_a_killed_run_on_this_machine_is_replaced(tmp_path, caplog):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(tmp_path, pid=int(ended.stdout), process_start=None)
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    assert "no longer running" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["what"] == "mine"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a live process holding it refuses; the same process id with another start time is another (reused) process
    _write_lock(tmp_path)
    with pytest.raises(OutputDirInUse, match=f"process {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path, "mine").acquire()
    _write_lock(tmp_path, process_start="1")
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    lock.release()


def test_a_lock_of_another_machine_is_watched_for_its_heartbeat(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 0.6)
    monkeypatch.setattr(runlock, "_POLL_S", 0.05)
    _write_lock(tmp_path, host="elsewhere")
    stop = threading.Event()

    def heartbeat():  # (the holder refreshes it, as its own thread does every HEARTBEAT_S)
        while not stop.wait(0.1):
            os.utime(tmp_path / LOCK_NAME)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(OutputDirInUse, match="on elsewhere"):
            RunLock(tmp_path, "mine").acquire()
    finally:
        stop.set()
        beating.join()
    started = time.monotonic()
    lock = RunLock(tmp_path, "mine")
    lock.acquire()  # no heartbeat for STALE_AFTER_S: its holder is gone
    assert time.monotonic() - started >= 0.6 and "waiting up to" in caplog.text
    lock.release()


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    first = os.stat(tmp_path / LOCK_NAME).st_mtime_ns
    time.sleep(0.3)
    assert os.stat(tmp_path / LOCK_NAME).st_mtime_ns > first
    lock.release()


def test_a_process_id_is_looked_up_only_in_its_own_process_table(tmp_path, monkeypatch, caplog):
    # Containers of one host share its name and boot id but number their processes apart: a live run's lock in
    # another PID namespace was replaced (its process id named no process here). On Windows `os.kill(pid, 0)` would
    # end the process. Both are watched for the holder's heartbeat instead.
    monkeypatch.setattr(runlock, "STALE_AFTER_S", 0.3)
    monkeypatch.setattr(runlock, "_POLL_S", 0.05)
    here = {"host": socket.gethostname(), "boot_id": runlock._boot_id(), "pid_namespace": runlock._pid_namespace()}
    if sys.platform.startswith("linux"):
        assert runlock._same_process_table(here)
        assert not runlock._same_process_table({**here, "pid_namespace": "pid:[1]"})
        assert not runlock._same_process_table({**here, "boot_id": "another boot"})
    with monkeypatch.context() as windows:
        windows.setattr(runlock.os, "name", "nt")
        assert not runlock._same_process_table(here)
    _write_lock(tmp_path, pid=1, pid_namespace="pid:[1]")  # (process 1 is alive here: not asked)
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    assert "waiting up to" in caplog.text
    lock.release()


def test_a_live_lock_that_replaced_a_stale_one_meanwhile_is_not_removed(tmp_path, monkeypatch):
    # Two runs find one stale lock; the first replaces it with its own just as the second removes "the stale one": a
    # read-compare-remove deleted the first run's live lock there, and both held the folder.
    _write_lock(tmp_path, what="a killed run", token="stale")
    monkeypatch.setattr(RunLock, "_holder_gone", lambda self, holder, raw: holder["token"] == "stale")
    warn = runlock.logger.warning

    def meanwhile(message, *args):  # (said just before the stale lock goes: the other run takes the folder now)
        warn(message, *args)
        if message.startswith("Replacing the lock"):
            if (tmp_path / LOCK_NAME).exists():
                os.remove(tmp_path / LOCK_NAME)
            _write_lock(tmp_path, what="the other run", token="live")

    monkeypatch.setattr(runlock.logger, "warning", meanwhile)
    with pytest.raises(OutputDirInUse, match="the other run"):
        RunLock(tmp_path, "mine").acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "live"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # (nothing left aside)
