"""What the commands share: one-line errors, the torch check, consoles that print text as it is."""

from __future__ import annotations

import errno
import importlib.util
import os
import queue
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable

import click
from rich.console import Console

from degrade.errors import DegradeError, DegradeWarning
from degrade.io import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, pixel_limit


def text_console(*, stderr: bool = False, **kwargs) -> Console:
    """A rich console that prints strings as they are: without rich's markup or emoji codes (paths, file
    names and error messages come from users and files: markup dropped '[x]' from them and failed on '[/b]',
    a traceback, and ':ok:' became an emoji; a style is a rich Text's), and each line whole (soft wrap: the
    terminal folds a long line, a log or a pipe keeps it; rich broke lines at 80 columns when piped, a path
    among them)."""
    return Console(stderr=stderr, markup=False, emoji=False, soft_wrap=True, **kwargs)


_show_warning = warnings.showwarning


def _show_degrade_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's DegradeWarning as the one line the commands print, `warning: ...` on stderr (Python's
    way adds the file, line and source of the call); any other warning as Python shows it."""
    if issubclass(category, DegradeWarning):
        print(f"warning: {' '.join(shown(message).split())}", file=sys.stderr if file is None else file, flush=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _show_degrade_warning  # every command imports this module


def _quiet_opencv() -> None:
    """OpenCV's own log lines off (its '[ WARN:0@1.8] ... PNG input buffer is incomplete' and '[ERROR:0@...]
    imdecode_' before our one-line refusal of the same file): the commands say what failed, once. The
    library leaves OpenCV's logging as it finds it; OPENCV_LOG_LEVEL, when set, still wins."""
    if "OPENCV_LOG_LEVEL" not in os.environ:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


_quiet_opencv()


_CONTROL = {**{c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]}, 9: "\\t", 10: "\\n", 13: "\\r"}


def shown(name: object) -> str:
    """A file name as a line of output shows it: control characters (C0, DEL and C1) escaped as Python
    writes them (a newline in a source's name printed a line of its own, a fake `Error: ...` line among
    them; an escape sequence in one reached the terminal)."""
    return str(name).translate(_CONTROL)


def os_error(exc: OSError) -> str:
    """An OSError as one line: 'path: reason'. A broken pipe while the output goes to a pipe (its reader
    gone: `| head`) is raised again instead, for click's quiet exit (status 1, no 'Error: [Errno 32] Broken
    pipe'); another process's pipe breaking, with the output on a terminal or in a file, is said."""
    if exc.errno == errno.EPIPE and exc.filename is None and _stdout_is_a_pipe():
        raise exc
    where = exc.filename if exc.filename is not None else ""
    return f"{shown(where)}: {exc.strerror}" if where and exc.strerror else " ".join(str(exc).split())


def _stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # closed, or replaced by an object without a descriptor
        return False


def one_line(exc: BaseException) -> str:
    """A refusal (DegradeError) or an OSError as the one line the commands print (names in it shown)."""
    return os_error(exc) if isinstance(exc, OSError) else " ".join(shown(exc).split())


def require_torch() -> None:
    """The dasr-* commands need PyTorch, an optional dependency of this package: say how to get it."""
    if importlib.util.find_spec("torch") is None:
        raise click.ClickException("PyTorch is not installed; the dasr-* commands need it: "
                                   "pip install '.[train]' in the checkout (on a CPU-only machine first: "
                                   "pip install torch --index-url https://download.pytorch.org/whl/cpu)")


def max_pixels_option(command):
    """--max-pixels N: the decoded-image cap of degrade.read_image, for this command and its workers."""
    return click.option(
        "--max-pixels", type=click.IntRange(1, 1 << 40), default=None, metavar="N",
        help=f"Largest image decoded, in pixels (default {DEFAULT_MAX_PIXELS:,}, or ${MAX_PIXELS_ENV}); checked "
             "from the file's header before decoding.")(command)


def parse_levels(text: str) -> list[int]:
    """--levels "1,2,3": distinct levels among 1, 2 and 3, in the order given (a level twice would be scored
    or made twice); a usage error otherwise."""
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        levels = []
    if not levels or not set(levels) <= {1, 2, 3} or len(set(levels)) != len(levels):
        raise click.BadParameter(f"{text!r}: expected a subset of 1,2,3, each level once", param_hint="--levels")
    return levels


def set_max_pixels(value: int | None) -> None:
    """--max-pixels into the environment; without it, $DEGRADE_MAX_PIXELS checked once, up front (a bad
    value was reported once per image, as each image's read failed)."""
    if value is not None:  # through the environment, so worker processes started later see it too
        os.environ[MAX_PIXELS_ENV] = str(value)
    try:
        pixel_limit()
    except DegradeError as exc:
        raise click.ClickException(str(exc)) from None


class Terminated(SystemExit):
    """SystemExit(143), raised by sigterm_as_exit's handler."""


def sigterm_as_exit() -> Callable[[], object]:
    """From now, SIGTERM raises SystemExit(143) (Terminated) in the main thread (a stop the command can clean
    up after); returns what puts the previous handlers back. Called from another thread (an embedding
    program's), it changes nothing: only the main thread may set a handler.

    A signal's exception raised while Python runs a finaliser (a __del__, a weakref callback) is printed as
    "Exception ignored in ..." and dropped, and the command ran on: a make-dataset stopped by `timeout`
    finished its dataset. While this is in force, such a dropped Terminated or KeyboardInterrupt (Ctrl-C,
    where SIGINT had Python's own handler) is sent again as its signal to the main thread, 10 ms later,
    by a thread kept for it: a real signal, so it also ends a blocking wait, and after restore() it meets
    the previous handler (the default one ends the process, 143). The finaliser's hook only puts the
    signal on a SimpleQueue (safe there: it takes no lock), and a handler that would raise inside the hook
    sends its signal again too."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    main, requests = threading.main_thread().ident, queue.SimpleQueue()

    def courier() -> None:
        while (signum := requests.get()) is not None:
            time.sleep(0.01)
            signal.pthread_kill(main, signum)

    def in_hook(frame) -> bool:
        while frame is not None and frame.f_code is not redeliver.__code__:
            frame = frame.f_back
        return frame is not None

    def stop(signum, frame):
        if in_hook(frame):  # raised here, it would be dropped as well
            requests.put(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise Terminated(143)

    def redeliver(unraisable) -> None:
        if isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
            requests.put(signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT)
        else:
            hook(unraisable)

    threading.Thread(target=courier, name="degrade-stop-courier", daemon=True).start()
    hook = sys.unraisablehook
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, stop)
    sys.unraisablehook = redeliver

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if sys.unraisablehook is redeliver:
            sys.unraisablehook = hook
        requests.put(None)  # the courier ends after any stop still to send

    return restore
