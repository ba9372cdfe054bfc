"""Run directories: where a run's config, metrics, samples and checkpoints live, written atomically."""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from grpo_cli.config import to_yaml
from grpo_cli.errors import UserError
from grpo_cli.schema import Config


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# What fsync answers where a filesystem cannot flush that kind of file (a folder on some FUSE mounts,
# SMB/CIFS, Windows): nothing to make durable there, so not an error. EIO, ENOSPC... still are.
_CANNOT_SYNC = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES, errno.EPERM,
                errno.EISDIR}


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a file renamed into it, say) durable: without it a power cut can undo the
    rename, leaving the old file or none, even though the new file's data was already on disk. Best
    effort where the filesystem cannot sync a folder (see _CANNOT_SYNC)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _CANNOT_SYNC:  # Windows cannot open a folder at all
            return
        raise
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves (deepest first), to disk: what a
    complete checkpoint needs before it is renamed into place, so the rename never names lost data."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes writable files only
            try:
                _fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC:
            raise


def prepare_run_dir(cfg: Config) -> Path:
    """Create (or, with resume=RUN_DIR, reopen) the run directory and save the resolved config in it.

    A new run never lands in a directory that already holds files: it is either named by the user
    (output_dir=...) and must be empty, or made fresh under runs/<recipe>/<timestamp>.
    """
    check_run_dir(cfg)
    if cfg.resume:  # its config as this run goes on (overrides such as a raised trainer.max_steps included)
        run = Path(cfg.resume).expanduser()
        lock_run(run, f"resume={cfg.resume}")
        with explained_write_errors(run, f"resume={cfg.resume}"):
            atomic_write_text(run / "config.yaml", to_yaml(dataclasses.replace(cfg, resume=None)))
        return run
    run = Path(cfg.output_dir).expanduser() if cfg.output_dir else fresh_dir(default_parent(cfg))
    with explained_write_errors(run, "the run directory"):
        for sub in ("checkpoints", "samples"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", to_yaml(cfg))
    lock_run(run, "the run directory")
    return run


LOCK_FILE = ".lock"
_locks: dict[Path, IO[str]] = {}  # the runs this process writes: their lock files, open (so locked) until it ends


def lock_run(run: Path, what: str) -> None:
    """One process writes a run at a time. A second `grpo train resume=RUN` while the first still ran (a job
    requeued before the old one stopped, say) deleted the first's checkpoint in progress, and the first's
    metrics then went to a file cut from the run. An OS lock (flock), so a killed process holds none; where
    the filesystem has no locks (some network mounts) the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    key = run.resolve()
    if key in _locks:  # this process's own (a test's second call)
        return
    f = (run / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise UserError(f"{what}: another `grpo train` (process {holder or '?'}) is writing {run}; wait for it "
                            "to end, or stop it, then run this again") from None
        return  # no locks on this filesystem
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[key] = f


def unlock_run(run: Path) -> None:
    f = _locks.pop(run.resolve(), None)
    if f is not None:
        f.close()


@contextmanager
def explained_write_errors(folder: Path, what: str) -> Iterator[None]:
    """A write under `folder` before training starts that fails for a full or read-only disk, as a
    UserError naming the fix: it ended `grpo train` (a resume after a full disk, say) with a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or e}); free space there (or make it "
                        "writable), then run the command again") from None


def check_run_dir(cfg: Config) -> None:
    """What `prepare_run_dir` will need, checked before the model loads and leaving nothing behind."""
    if cfg.resume:
        if not (Path(cfg.resume).expanduser() / "config.yaml").is_file():
            raise UserError(f"resume={cfg.resume}: not a run directory (no config.yaml); pass the folder a "
                            "previous `grpo train` wrote")
        check_writable(Path(cfg.resume).expanduser(), f"resume={cfg.resume}")
    elif cfg.output_dir:
        out = check_output_dir(cfg.output_dir, f"continue that run with resume={cfg.output_dir}")
        check_writable(nearest_existing(out), f"output_dir={cfg.output_dir}")
    else:
        parent = default_parent(cfg)
        check_writable(nearest_existing(parent).resolve(),
                       f"the run directory (under {parent}, as no output_dir is set)",
                       "set output_dir to a writable folder, or run grpo from one")


def default_parent(cfg: Config) -> Path:
    """Where a run without output_dir gets its fresh directory: runs/<recipe> in the working directory."""
    return Path("runs") / (cfg.recipe or "default")


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest ancestor that does: where a folder to be made is written."""
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable(folder: Path, what: str, fix: str = "choose a writable folder") -> None:
    """A folder the run will write into: a read-only one (or one this user cannot write) fails now, not at
    the first checkpoint. A full disk may still take this empty file: a save names that itself."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or e}); {fix}") from None


def discard_new_run_dir(cfg: Config, run: Path) -> None:
    """Undo `prepare_run_dir` for a new run that failed before its first step (a model that cannot load,
    an engine that cannot start): its config.yaml alone would make output_dir "already hold files" and
    refuse the corrected command. Only what `prepare_run_dir` wrote goes, and folders left empty; a
    named output_dir itself stays (the user may have made it, and empty it takes the next run). The run's
    lock goes too: held by this process until it ends, its file would also block the corrected command."""
    (run / "config.yaml").unlink(missing_ok=True)
    unlock_run(run)
    (run / LOCK_FILE).unlink(missing_ok=True)
    for folder in (run / "checkpoints", run / "samples", *([] if cfg.output_dir else [run])):
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there): keep it
            pass


def check_output_dir(output_dir: str, alternative: str | None = None) -> Path:
    """A named folder for new results must be new or empty (and not a file, nor inside one)."""
    out = Path(output_dir).expanduser()
    existing = nearest_existing(out)
    if not existing.is_dir():
        what = f"output_dir={output_dir}" + ("" if existing == out else f": {existing}")
        raise UserError(f"{what} is a file, not a folder; choose another output_dir")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output_dir={output_dir} already holds files; choose a new output_dir"
                        + (f", or {alternative}" if alternative else ""))
    return out


def fresh_dir(parent: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run = parent / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run.mkdir(parents=True)
            return run
        except FileExistsError:  # two runs started within the same second
            continue
    raise UserError(f"cannot create a fresh run directory under {parent}")
