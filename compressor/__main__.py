"""The ``compress`` executable (and ``python -m compressor``): the signal handlers first, then the command line and
its imports, so that Ctrl-C at any moment after Python's own start-up ends in the interrupt's one line and exit
status."""

import signal

from . import interrupts


def run() -> None:
    interrupts.install()
    try:
        from .cli import run as run_command_line

        run_command_line()
    except KeyboardInterrupt as error:  # arrived before the command line's own handling began
        interrupts.exit_interrupted(getattr(error, "signum", signal.SIGINT))
    except Exception:  # an import interrupted half-way can turn the interrupt into another error
        if not interrupts.received:
            raise
        interrupts.exit_interrupted(interrupts.received[0])


if __name__ == "__main__":
    run()
