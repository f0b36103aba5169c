"""Experiments: ``python -m experiments.<name>``, each a typed config and ``main()``.

Run that way (``sys.argv[0]`` is ``-m`` while Python imports the package), Ctrl-C
is held until ``jaxtrain.cli.run`` starts: JAX's import takes seconds, and a
``KeyboardInterrupt`` raised in it was lost in a garbage-collector callback (the
run went on to the end) or ended in a traceback. ``run`` then exits 130 with
``error: interrupted``.
"""

import signal
import sys
import threading


def _hold_interrupt(signum, frame) -> None:
    _hold_interrupt.held.append(signum)


_hold_interrupt.held = []
if (sys.argv[:1] == ["-m"] and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, _hold_interrupt)
