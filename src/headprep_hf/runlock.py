"""One run at a time in an output folder: `RunLock` holds `<folder>/_headprep_run.lock` while a run writes there.

Two runs started into one `output_dir` both passed the start-of-run checks (no earlier outputs yet) and then replaced
each other's checkpoints, prepared head and measurements without an error. The lock is a file created exclusively
(`O_CREAT | O_EXCL`) that names its holder (host, process id and start, time). The holder refreshes its modification
time every `HEARTBEAT_S` seconds from a daemon thread, so a lock whose holder was killed is recognised:

* on the same machine at once: its process is gone (or the process id now belongs to another process);
* from another machine (a shared file system), by watching it: a lock left unchanged for `STALE_AFTER_S` seconds has
  no live holder. Only the lock's own modification times are compared, never the two machines' clocks.

A lock found stale is replaced, with a warning. The name starts with `_`: `Trainer`'s Hub uploads leave such files
out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

logger = logging.getLogger(__name__)

LOCK_NAME = "_headprep_run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 90.0  # three missed heartbeats
_POLL_S = 5.0


class OutputDirInUse(ValueError):
    """Another live run holds the folder's lock; the message names it and the fix."""


def _boot_id() -> str | None:
    try:  # (Linux: a process id names a process only within one boot)
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux): containers sharing a host name and boot id number processes apart."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused process id apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _same_process_table(holder: dict | None) -> bool:
    """Whether the holder's process id names a process this process can look up: the same machine (host; on Linux
    also the boot and the PID namespace, since containers of one host share its name and number their processes
    apart). Never on Windows, where `os.kill(pid, 0)` would end that process. Otherwise the lock is watched."""
    if holder is None or os.name == "nt" or holder.get("host") != socket.gethostname():
        return False
    if sys.platform.startswith("linux"):
        here = (_boot_id(), _pid_namespace())
        return None not in here and (holder.get("boot_id"), holder.get("pid_namespace")) == here
    return True  # (macOS, BSD: one process table per machine)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        return True
    return True


class RunLock:
    """The lock of `folder` for the run described by `what` (e.g. "HeadPrepTrainer.train()")."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.what = os.fspath(folder), what
        self.path = os.path.join(self.folder, LOCK_NAME)
        self._token: str | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> None:
        """Take the lock, replacing a stale one (with a warning); `OutputDirInUse` when a live run holds it."""
        os.makedirs(self.folder, exist_ok=True)
        token = uuid.uuid4().hex
        record = {
            "what": self.what,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "token": token,
        }
        for _ in range(3):  # (a stale lock replaced, and another process taking it in between, at most)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, raw = self._read()
                if not self._holder_gone(holder, raw):
                    raise OutputDirInUse(self._in_use_message(holder)) from None
                self._remove_if_unchanged(raw, holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            self._token = token
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._heartbeat, name="headprep-run-lock", daemon=True)
            self._thread.start()
            return
        raise OutputDirInUse(self._in_use_message(self._read()[0]))

    def release(self) -> None:
        """Stop the heartbeat and remove the lock where it is still this run's."""
        if self._token is None:
            return
        self._stop.set()
        self._thread.join()
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self._token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self._token = self._stop = self._thread = None

    # ------------------------------------------------------------------ internals
    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # (removed by hand: the run goes on; the next run will not find it)
                pass

    def _read(self) -> tuple[dict | None, bytes | None]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = None  # (a holder killed while writing it: judged by watching it)
        return (holder if isinstance(holder, dict) else None), raw

    def _holder_gone(self, holder: dict | None, raw: bytes | None) -> bool:
        if raw is None:
            return True  # (released in the meantime)
        if _same_process_table(holder):
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _alive(pid):
                return True
            started = holder.get("process_start")
            return started is not None and _process_start(pid) not in (None, started)  # (the id was reused)
        return self._unchanged_for_a_while()

    def _unchanged_for_a_while(self) -> bool:
        """Watch the lock of another machine's run: gone when neither its time nor its content change for
        `STALE_AFTER_S` seconds (the holder refreshes it every `HEARTBEAT_S`)."""
        try:
            first = os.stat(self.path)
        except FileNotFoundError:
            return True
        holder, _ = self._read()
        if holder is None:  # (an empty file was blamed on "a run on another machine (unknown)")
            logger.warning(
                "%s holds no readable record (its run was killed while writing it, or is writing it now); waiting up "
                "to %.0f s to see whether it changes.", self.path, STALE_AFTER_S,
            )  # fmt: skip
        else:
            logger.warning(
                "%s is held by a run on another machine (%s); waiting up to %.0f s to see whether it is still "
                "running.", self.path, holder.get("host", "unknown"), STALE_AFTER_S,
            )  # fmt: skip
        deadline = time.monotonic() + STALE_AFTER_S
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                return True
            if (now.st_mtime_ns, now.st_ino, now.st_size) != (first.st_mtime_ns, first.st_ino, first.st_size):
                return False
        return True

    def _remove_if_unchanged(self, raw: bytes | None, holder: dict | None) -> None:
        """Remove the stale lock `raw`, and only it. It is renamed away first (one process wins a rename), then
        compared: where another process had replaced it by a live lock in the meantime, that lock is put back (a
        read-then-remove deleted it, and both runs held the folder)."""
        if raw is None:
            return
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # (another process removed it first: look again)
        try:
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != raw:  # (not the stale lock: another run's new one) put back where nothing took its place
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return
            logger.warning(
                "Replacing the lock %s of a run that is no longer running (%s); that run may have left a checkpoint "
                "being written, which a resume skips.",
                self.path, self._describe(holder),
            )  # fmt: skip
        finally:
            os.remove(aside)

    @staticmethod
    def _describe(holder: dict | None) -> str:
        if holder is None:
            return "an unreadable lock file"
        what, pid, host, since = (holder.get(k) for k in ("what", "pid", "host", "since"))
        return f"{what or 'a run'}, process {pid} on {host} since {since}"

    def _in_use_message(self, holder: dict | None) -> str:
        return (
            f"output_dir {self.folder} is in use by another run ({self._describe(holder)}): two runs writing one "
            "folder replace each other's checkpoints and results. Wait for that run to end, or pick another "
            f"output_dir. If that run is no longer running, delete {self.path}."
        )


@contextlib.contextmanager
def first_process_lock(folder: str | os.PathLike, what: str, process_index: int, num_processes: int):
    """`folder`'s `RunLock`, held by the first process for the block. Every process refuses together: a refusal on
    the first alone would leave the others waiting in their first collective call. An error taking the lock other
    than `OutputDirInUse` (a read-only folder) is raised as it is in one process, and named in an `OutputDirInUse`
    with several."""
    lock, refusal = None, None
    if process_index == 0:
        lock = RunLock(folder, what)
        try:
            lock.acquire()
        except Exception as error:  # noqa: BLE001 - any failure here must reach every process (see below)
            if not isinstance(error, OutputDirInUse) and num_processes == 1:
                raise
            refusal = error if isinstance(error, OutputDirInUse) else f"{lock.path} could not be taken ({error!r})"
    if num_processes > 1:
        from accelerate.utils import gather_object

        refusal = next((r for r in gather_object([None if refusal is None else str(refusal)]) if r), None)
    if refusal:
        if lock is not None:
            lock.release()  # (held only where another process refused)
        raise refusal if isinstance(refusal, OutputDirInUse) else OutputDirInUse(str(refusal))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
