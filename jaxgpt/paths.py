"""One path layer for everything a run reads and writes: a local folder and a `gs://` bucket
are the same code path (etils.epath; gcsfs behind gs://, tensorstore for orbax's arrays).

Whole-file writes are atomic in both places, differently: locally a temporary file is renamed
over the target; on Cloud Storage an object upload is atomic by itself (there is no rename),
so the object is written in one go. Appends (metrics.jsonl) rewrite the object on GCS.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etils import epath

from jaxgpt.errors import UserError

log = logging.getLogger("jaxgpt")

GCS = "gs://"
# Cloud Storage: a request that gets no answer for this long fails (gcsfs and tensorstore) instead of hanging
# the job; gcsfs and tensorstore retry 429/5xx and dropped connections with backoff themselves, and
# retrying() below retries what still fails. JAXGPT_GCS_TIMEOUT overrides it (seconds).
GCS_TIMEOUT_S = 60.0
RETRIES = 4  # attempts of a whole storage operation (retrying)
_TRANSIENT = ("timeout", "timed out", "deadline", "unavailable", "connection", "server disconnected", "reset by peer",
              "broken pipe", "temporarily")
# HTTP statuses worth retrying, as words: inside a URL's port or an object's name ("...:44291/", "step-500")
# they are not statuses
_TRANSIENT_STATUS = re.compile(r"\b(429|500|502|503)\b")
_URL = re.compile(r"\w+://\S+")


def gcs_timeout_s() -> float:
    """The Cloud Storage request timeout: JAXGPT_GCS_TIMEOUT, read when the clients are configured (not at
    import, so a process that sets it before using storage gets it), else GCS_TIMEOUT_S."""
    value = os.environ.get("JAXGPT_GCS_TIMEOUT", "")
    if not value:
        return GCS_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):  # inf would fail later, converting it for tensorstore
        raise UserError(f"JAXGPT_GCS_TIMEOUT={value!r} is not a positive number of seconds: set it to e.g. 60, or unset it")
    return seconds


class StorageError(UserError):
    """A read or write that failed for good (after retries): train.py adds which checkpoint is intact."""


def describe(e: BaseException, limit: int = 160) -> str:
    """'Type: first line of the message' for one-line errors (some exceptions carry no message)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


def is_transient(e: BaseException) -> bool:
    """A storage error worth retrying (a timeout, a dropped connection, a 429/5xx): not a missing
    or damaged file."""
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    if isinstance(e, (FileNotFoundError, FileExistsError, UserError)):
        return False
    text = _URL.sub(" ", f"{type(e).__name__} {e}".lower())
    return any(word in text for word in _TRANSIENT) or _TRANSIENT_STATUS.search(text) is not None


def retrying(what: str, fn: Any, *args: Any, attempts: int = RETRIES, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), retried with exponential backoff (1, 2, 4 s) on transient storage errors;
    after the last attempt, one UserError naming `what` and the error."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == attempts - 1:
                raise StorageError(f"{what} failed after {attempts} attempts: the storage did not answer "
                                   f"({describe(e)})") from None
            log.warning("%s: %s; retrying in %d s", what, describe(e, 100), 2 ** attempt)
            time.sleep(2 ** attempt)


def path(p: str | os.PathLike) -> epath.Path:
    """epath.Path for a local path or a gs:// URL (pathlib would fold `gs://` into `gs:/`)."""
    return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p) if not isinstance(p, str) else p)


def cache_home() -> Path:
    """jaxgpt's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache): compiled programs, fetched data."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxgpt"


def is_remote(p: Any) -> bool:
    return str(p).startswith(GCS)


def write_bytes(p: Any, data: bytes) -> None:
    """Write a whole file so that readers see the old or the new content, never a part."""
    p = path(p)
    if is_remote(p):
        try:
            retrying(f"writing {p}", p.write_bytes, data)  # one object upload
        except UserError:
            raise
        except Exception as e:  # refused for good (403, 404 bucket, ...)
            raise StorageError(f"writing {p} failed ({describe(e)})") from None
        return
    Path(p).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(p).parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(p: Any, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def append_text(p: Any, text: str) -> None:
    """Append locally; rewrite the object on GCS (objects cannot be appended to)."""
    p = path(p)
    if is_remote(p):
        old = retrying(f"reading {p}", lambda: p.read_bytes() if p.exists() else b"")
        write_bytes(p, old + text.encode("utf-8"))
    else:
        with open(p, "a") as f:
            f.write(text)


def unwritable_out_dir(folder: Any, e: OSError) -> UserError:
    """The one line for a run folder that refuses writes (the run lock and the preflight both meet it)."""
    return UserError(f"cannot write to out_dir {folder} ({e.strerror or e}); choose a writable --out_dir")


def ensure_dir(p: Any) -> None:
    """mkdir -p locally; nothing on GCS, where folders exist once an object is inside."""
    if not is_remote(p):
        Path(path(p)).mkdir(parents=True, exist_ok=True)


def configure_gcs() -> bool:
    """For the CLIs (importing jaxgpt never does this): with the standard STORAGE_EMULATOR_HOST
    set, point every Cloud Storage client at that emulator — gcsfs follows the variable itself,
    tensorstore reads TENSORSTORE_GCS_HTTP_URL, and a dummy GOOGLE_AUTH_TOKEN_FOR_TESTING stands in
    for credentials. Always: no stale gcsfs directory listings (another host's writes must be
    visible) and no per-call warnings from the Cloud Storage clients. Returns emulator or not."""
    # tensorstore (orbax's array writes): a transfer below 1 byte/s for the timeout is abandoned and retried,
    # a bounded number of times (its default, 32 retries of up to 32 s each, let a stalled bucket hold a job ~15 min)
    timeout = gcs_timeout_s()
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(max(1, int(timeout))))
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
    _bound_tensorstore_retries()
    for name in ("gcsfs", "google.auth", "google.cloud", "fsspec"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL)
        logger.propagate = False
    warnings.filterwarnings("ignore", message="Append mode .* is not supported")
    warnings.filterwarnings("ignore", module="google.auth")
    try:
        import fsspec.config
        conf = fsspec.config.conf.setdefault("gcs", {})
        conf.setdefault("use_listings_cache", False)
        conf.setdefault("requests_timeout", timeout)  # per HTTP request: no answer -> an error, not a hang
    except ImportError:
        pass
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if not host or host == "default":
        return False
    host = (host if host.startswith(("http://", "https://")) else "http://" + host).rstrip("/")
    os.environ["STORAGE_EMULATOR_HOST"] = host  # the python clients need the scheme, tensorstore no trailing /
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # a bucket-type probe that needs credentials
    os.environ.setdefault("NO_GCE_CHECK", "true")
    _quiet_tensorstore_auth(timeout)
    return True


TENSORSTORE_RETRIES = {"max_retries": 6, "initial_delay": "1s", "max_delay": "8s"}


def _bound_tensorstore_retries() -> None:
    """Give orbax's tensorstore contexts TENSORSTORE_RETRIES. orbax builds every context from these
    two module dicts (orbax.checkpoint's tensorstore_utils, checked present from 0.11.17 to 0.12.8);
    without them (another orbax) tensorstore keeps its own defaults, which only makes a stall longer."""
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
    except ImportError:
        return
    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        context = getattr(tsu, name, None)
        if isinstance(context, dict):
            context.setdefault("gcs_request_retries", dict(TENSORSTORE_RETRIES))


def _quiet_tensorstore_auth(timeout: float) -> None:
    """tensorstore logs one C++ INFO line when it first builds its GCS credentials; build them
    now, while the process's stderr (fd 2, which Python's logging cannot filter) is muted."""
    try:
        import tensorstore as ts
    except ImportError:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        context = ts.Context({"gcs_request_retries": TENSORSTORE_RETRIES})
        store = ts.KvStore.open({"driver": "gcs", "bucket": "jaxgpt-credentials-warmup"}, context=context).result(
            timeout=timeout)
        store.read("warmup").result(timeout=timeout)
    except Exception:  # the bucket need not exist: only the credential provider matters
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def check_gcs(p: Any) -> None:
    """One clear line instead of a traceback when gs:// cannot be used from here."""
    if not is_remote(p):
        return
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise UserError(f"{p}: Cloud Storage paths need gcsfs; pip install 'jaxgpt[gcs]'") from None
    try:
        path(p).exists()
    except Exception as e:  # auth, network, a bucket that does not exist
        raise UserError(f"cannot reach {p} ({describe(e)}); check the bucket "
                        f"name and credentials (gcloud auth application-default login)") from None


def sha256(p: Any) -> str:
    digest = hashlib.sha256()
    with path(p).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


CHUNK_BYTES = 8 << 20  # one ranged request of a Cloud Storage read or write: each bounded by the storage timeout


def is_url(p: Any) -> bool:
    """gs:// and any other fsspec URL (hf://, s3://, https://): read through fsspec, not the local file system."""
    return "://" in str(p)


def _fs(url: Any) -> tuple[Any, str]:
    """The fsspec file system of a URL (gcsfs for gs://, configured by configure_gcs) and the path inside it."""
    import fsspec
    return fsspec.core.url_to_fs(str(url))


def glob_urls(pattern: str) -> list[str]:
    """Sorted matches of a glob, local or a URL (each match as a full URL)."""
    if not is_url(pattern):
        import glob
        return sorted(glob.glob(pattern))
    fs, root = _fs(pattern)
    return sorted(fs.unstrip_protocol(m) for m in retrying(f"listing {pattern}", fs.glob, root))


def version(p: Any) -> tuple[int, str]:
    """(size, what identifies this version of the file): its mtime locally, else the object's generation,
    checksum or etag. FileNotFoundError when it does not exist."""
    if not is_url(p):
        st = os.stat(str(p))
        if not os.path.isfile(str(p)):
            raise FileNotFoundError(p)
        return st.st_size, str(st.st_mtime_ns)
    fs, root = _fs(p)
    info = retrying(f"reading {p}", fs.info, root)
    if info.get("type") == "directory":
        raise FileNotFoundError(p)
    tag = next((str(info[k]) for k in ("generation", "crc32c", "md5Hash", "ETag", "etag", "last_commit", "mtime")
                if info.get(k)), "")
    return int(info.get("size") or 0), tag


def size(p: Any) -> int:
    """A file's or object's size in bytes."""
    return version(p)[0]


def open_read(p: str) -> Any:
    """A binary stream of a local file or a URL (fsspec reads a remote one in ranged blocks)."""
    if not is_url(p):
        return open(p, "rb")
    import fsspec
    return fsspec.open(p, "rb", block_size=CHUNK_BYTES).open()


def read_range(p: Any, start: int, end: int) -> bytes:
    """Bytes start..end-1 of a file or object (one ranged request for a URL)."""
    if is_url(p):
        fs, root = _fs(p)
        return retrying(f"reading {p}", fs.cat_file, root, start=start, end=end)
    with open(str(p), "rb") as f:
        f.seek(start)
        return f.read(end - start)


def download(src: Any, dst: Path) -> None:
    """Copy a gs:// object to a local file in ranged requests of CHUNK_BYTES (memory and each request's time
    bounded, each retried on its own), atomically: dst holds the whole object or nothing new."""
    total = size(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for start in range(0, total, CHUNK_BYTES):
                f.write(read_range(src, start, min(total, start + CHUNK_BYTES)))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload(local: Path, dst: Any) -> None:
    """Stream a local file to gs:// in CHUNK_BYTES blocks (a resumable upload: never the whole file in memory);
    the object appears whole when the upload is finalized, or not at all."""
    def once() -> None:
        fs, root = _fs(dst)
        with open(local, "rb") as r, fs.open(root, "wb", block_size=CHUNK_BYTES) as w:
            shutil.copyfileobj(r, w, CHUNK_BYTES)
    try:
        retrying(f"uploading {dst}", once)
    except UserError:
        raise
    except Exception as e:  # refused for good (403, a bucket that does not exist, ...)
        raise StorageError(f"uploading {dst} failed ({describe(e)})") from None


@contextlib.contextmanager
def fetched(p: Any) -> Iterator[Path]:
    """A local path for reading `p`: itself, or a temporary download of a gs:// file or folder."""
    if not is_remote(p):
        yield Path(path(p))
        return
    src = path(p)
    if not src.exists():
        raise UserError(f"{p} does not exist")
    with tempfile.TemporaryDirectory(prefix="jaxgpt-fetch-") as tmp:
        dst = Path(tmp) / src.name
        if src.is_dir():
            for f in src.rglob("*"):
                if not f.is_dir():
                    download(f, dst / str(f)[len(str(src)) + 1:])
        else:
            download(src, dst)
        yield dst


def publish(local: Path, dst: Any) -> None:
    """Upload a finished local file or folder to `dst` (gs://), file by file."""
    target = path(dst)
    for f in sorted(local.rglob("*")) if local.is_dir() else [local]:
        if f.is_file():
            upload(f, target / str(f.relative_to(local)) if local.is_dir() else target)


def remove(p: Any) -> None:
    p = path(p)
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()
