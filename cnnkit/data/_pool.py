"""Worker processes for decoding, shared by the cache and the doctor (and for writing the built-in sets' PNGs).

On Linux the workers are forked: a forked child does not re-import the user's ``__main__``, so a
tutorial-style script that calls ``cnnkit.train(...)`` at top level (no ``if __name__ ==
"__main__":`` guard) works, and start-up costs milliseconds, not an interpreter per worker. The
children only run Pillow and numpy code, never the deep-learning backend whose threads may be live
in the parent, which is what makes forking them safe. Elsewhere (macOS, Windows) they are spawned.
Workers die with their parent (Linux: PR_SET_PDEATHSIG), so a killed run leaves no process behind.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
import warnings

_PR_SET_PDEATHSIG = 1


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a multi-threaded process; see the module docstring.
        warnings.simplefilter("ignore", DeprecationWarning)
        return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                                      initializer=_die_with_parent, initargs=(os.getpid(),))


def _die_with_parent(parent: int) -> None:
    """A worker ends when the process that started it dies, even by SIGKILL.

    Otherwise a worker whose parent was killed waits forever on its task queue (a forked child holds
    both ends of the queue's pipe, so it never sees end-of-file), keeping memory and the parent's
    file locks: a killed run's partial folder would look alive.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
