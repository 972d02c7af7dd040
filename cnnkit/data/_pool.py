"""Worker processes for decoding, shared by the cache and the doctor.

On Linux the workers are forked: a forked child does not re-import the user's ``__main__``, so a
tutorial-style script that calls ``cnnkit.train(...)`` at top level (no ``if __name__ ==
"__main__":`` guard) works, and start-up costs milliseconds, not an interpreter per worker. The
children only run Pillow and numpy code, never the deep-learning backend whose threads may be live
in the parent, which is what makes forking them safe. Elsewhere (macOS, Windows) they are spawned.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import sys
import warnings


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a multi-threaded process; see the module docstring.
        warnings.simplefilter("ignore", DeprecationWarning)
        return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
