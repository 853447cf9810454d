"""One writer per run folder: a lock object `<out_dir>/.lock` taken at start, renewed while the run
lives, removed at its end.

Creating it is atomic in both places: locally with O_CREAT | O_EXCL, on Cloud Storage with an
object generation precondition (`ifGenerationMatch=0`: the upload fails if the object exists).
A second writer is refused with one line naming the holder (host, pid, start time). A lock left
behind by a run that died (SIGKILL, preemption) does not block its restart: it is stale when its
holder ran on this host and that pid is gone (or is another process), or when its lease has not
been renewed for LEASE_S seconds (a holder on another host). A stale lock is replaced, again
atomically: locally by renaming it aside first, on Cloud Storage by deleting exactly that
generation. Readers (generate, eval, parity --checkpoint) never take the lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxgpt import paths
from jaxgpt.errors import UserError

LOCK_FILE = ".lock"
LEASE_S = 120.0  # a lock not renewed for this long is stale (renewed every LEASE_S / 4)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (guards against a reused pid); None when it is not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""


class RunLock:
    """with RunLock(out_dir): ... — the run's exclusive right to write out_dir."""

    def __init__(self, out_dir: Any, lease_s: float = LEASE_S):
        self.path = paths.path(out_dir) / LOCK_FILE
        self.lease_s = lease_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "proc_start": _process_start(os.getpid()), "renewed": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation: Any = None
        self._made_folder = False

    # --- the two stores ---
    def _create(self, record: dict[str, Any]) -> bool:
        data = json.dumps(record).encode()
        if paths.is_remote(self.path):
            return self._gcs_create(data)
        folder = paths.path(self.path.parent)
        try:
            if not folder.exists():
                paths.ensure_dir(folder)
                self._made_folder = True  # a run refused before writing anything leaves no empty folder behind
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise paths.unwritable_out_dir(folder, e) from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _gcs(self) -> tuple[Any, str]:
        import gcsfs

        fs = gcsfs.GCSFileSystem()
        return fs, str(self.path).removeprefix(paths.GCS)

    def _gcs_create(self, data: bytes) -> bool:
        fs, key = self._gcs()
        try:
            fs.pipe_file(key, data, mode="create")
        except Exception as e:  # 412 precondition failed: the object exists
            if getattr(e, "code", None) == 412 or isinstance(e, FileExistsError) or "412" in str(e):
                return False
            raise
        self._generation = fs.info(key).get("generation")
        return True

    def _read(self) -> tuple[dict[str, Any] | None, Any]:
        """(record, generation) of the current lock; (None, None) when there is none."""
        try:
            if paths.is_remote(self.path):
                fs, key = self._gcs()
                info = fs.info(key)
                return json.loads(fs.cat_file(key)), info.get("generation")
            return json.loads(Path(self.path).read_text()), None
        except FileNotFoundError:
            return None, None
        except (ValueError, OSError):  # cut short while being written: treat as stale but present
            return {}, None

    def _remove_stale(self, generation: Any) -> None:
        """Take a stale lock away so that exactly one restart can create the new one."""
        if paths.is_remote(self.path):
            from fsspec.asyn import sync

            fs, key = self._gcs()
            bucket, name = key.split("/", 1)
            conditions = {"ifGenerationMatch": str(generation)} if generation is not None else {}
            try:  # deletes exactly the stale generation: a lock recreated meanwhile survives (412)
                sync(fs.loop, fs._call, "DELETE", "b/{}/o/{}", bucket, name, **conditions)
            except Exception as e:
                if not (isinstance(e, FileNotFoundError) or getattr(e, "code", None) in (404, 412)):
                    raise
            fs.invalidate_cache()
            return
        aside = Path(f"{self.path}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)  # atomic: only one contender moves it
            aside.unlink()
        except FileNotFoundError:
            pass

    def stale(self, record: dict[str, Any]) -> str | None:
        """Why the lock in `record` is stale, or None when its holder may still be running."""
        if not record:
            return "an unreadable lock"
        if record.get("host") == socket.gethostname():
            start = _process_start(int(record.get("pid", -1)))
            if start is None:
                return f"its process {record.get('pid')} is gone"
            if record.get("proc_start") and start and start != record["proc_start"]:
                return f"pid {record.get('pid')} is now another process"
            return None
        if time.time() - float(record.get("renewed", 0)) > self.lease_s:
            return f"not renewed for {time.time() - float(record.get('renewed', 0)):.0f} s (lease {self.lease_s:.0f} s)"
        return None

    # --- the lock ---
    def acquire(self) -> None:
        for _ in range(3):  # a stale lock removed by another restart at the same moment: try again
            if self._create(self.holder):
                self._thread = threading.Thread(target=self._renew, daemon=True, name="jaxgpt-run-lock")
                self._thread.start()
                return
            record, generation = self._read()
            if record is None:
                continue
            why = self.stale(record)
            if why is None:
                raise UserError(f"{self.path.parent} is being written by another run (host {record.get('host')}, pid "
                                f"{record.get('pid')}, started {record.get('started')}); wait for it, stop it, or choose "
                                f"another --out_dir")
            self._remove_stale(generation)
        raise UserError(f"could not take the lock {self.path}: it keeps reappearing; is another run starting there?")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.holder["renewed"] = time.time()
                paths.write_text(self.path, json.dumps(self.holder))
            except Exception:  # a transient storage error: the next renewal tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        record, _ = self._read()
        if record and record.get("pid") == self.holder["pid"] and record.get("host") == self.holder["host"]:
            try:
                paths.path(self.path).unlink()
            except FileNotFoundError:
                pass
            if self._made_folder:
                try:
                    os.rmdir(str(self.path.parent))  # only succeeds when the run wrote nothing else
                except OSError:
                    pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(out_dir: Any) -> Iterator[None]:
    """The run's lock, taken by process 0 for every process of a multi-host run; every process
    learns the outcome, so a refused run stops on all hosts at once."""
    import jax
    import numpy as np

    lock = RunLock(out_dir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
            error = f"{out_dir} is being written by another run (process 0 could not take its lock)"
    if error is not None:
        raise UserError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
