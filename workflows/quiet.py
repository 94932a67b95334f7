"""TensorFlow's native start-up lines kept off the user's terminal.

Importing TensorFlow 2.21 writes, from C++ and before absl's logging is initialised (so
`TF_CPP_MIN_LOG_LEVEL` cannot silence them), "All log messages before absl::InitializeLog()...",
the oneDNN notice and "Could not find cuda drivers", twice; on a machine without a GPU the first
device probe adds a cuInit error. They go straight to file descriptor 2, so the one way to keep
them off a terminal is to point that descriptor elsewhere while TensorFlow loads. `install()`
does so for whichever import comes first (the CLI loads TensorFlow lazily, after its cheap
checks, from many places); Ray workers run it as their `worker_process_setup_hook`.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import tempfile

# Read by Ray workers, which inherit it through the runtime environment: `-v` shows everything.
VERBOSE_ENV = "ADVTRAIN_VERBOSE"
# `-q`: results and errors only (no progress bars, no Tune status table).
QUIET_ENV = "ADVTRAIN_QUIET"


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


@contextlib.contextmanager
def native_stderr_held():
    """Points file descriptor 2 at a temporary file for the block. If the block raises, what
    was written there is shown after all: for a failed TensorFlow import it is the only account
    of why."""
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)

        def restore():
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)

        try:
            yield
        except BaseException:
            restore()
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        restore()


class _QuietLoader(importlib.abc.Loader):
    """The real loader of `tensorflow`, run with descriptor 2 held."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with native_stderr_held():
            self._loader.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install(verbose: bool | None = None, *, quiet: bool = False) -> None:
    """Keeps TensorFlow's native log lines off descriptor 2 in this process, unless `verbose`.

    Call before anything imports TensorFlow; a no-op once it is loaded. `TF_CPP_MIN_LOG_LEVEL`
    is raised to 3 (errors too: the cuInit error of a CPU-only machine is one) unless the user
    set it. With `verbose=None` the choice is read from `ADVTRAIN_VERBOSE` (Ray workers).
    `quiet` is recorded for `is_quiet()`.
    """
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    else:  # the driver: the command line decides, for this call (tests run several in one process)
        os.environ[QUIET_ENV] = "1" if quiet else "0"
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


def worker_setup() -> None:
    """Ray's `worker_process_setup_hook`: every worker process, before it runs a task."""
    install(None)


class _OnceFilter(logging.Filter):
    """Lets the first record through and drops its repeats (Ray's token-auth notice is logged
    at every `ray.init`, and a command may connect more than once)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _DropFilter(logging.Filter):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


_RAY_TUNE_LOGGER = "ray.tune.tune"


def tame_ray_notices() -> None:
    """Ray's notices that mislead or repeat, in the driver: the token-auth notice once per
    process, and Tune's `Resume experiment with: Tuner.restore(...)` hint never (advtrain says
    `advtrain tune --resume ...`, which restores with the search's own trainable and spec)."""
    from workflows.ray_internals import AUTH_LOGGER

    auth = logging.getLogger(AUTH_LOGGER)
    if not any(isinstance(f, _OnceFilter) for f in auth.filters):
        auth.addFilter(_OnceFilter())
    tune = logging.getLogger(_RAY_TUNE_LOGGER)
    if not any(isinstance(f, _DropFilter) for f in tune.filters):
        tune.addFilter(_DropFilter("Resume experiment with:"))
