"""The ``compress`` executable (and ``python -m compressor``): the signal handlers first, then the command line,
whose imports take a noticeable part of a second, so that Ctrl-C at any moment ends in the interrupt's one line and
exit status."""

import signal

from . import interrupts


def run() -> None:
    interrupts.install()
    try:
        from .cli import run as run_command_line

        run_command_line()
    except KeyboardInterrupt as error:  # arrived before the command line's own handling began
        interrupts.exit_interrupted(getattr(error, "signum", signal.SIGINT))


if __name__ == "__main__":
    run()
