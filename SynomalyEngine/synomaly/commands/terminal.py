"""What the commands print: progress bars with time left, the one-line error, the engine's warnings."""
import sys


def error_line(message: str) -> str:
    """The documented one-line error, even when a library's message spans several lines."""
    return "synomaly: error: " + " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def bar_disabled(enabled: bool):
    """Bars only on a terminal (tqdm's ``None``): logs and captured output get no carriage-return noise."""
    return True if not enabled else None


class Progress:
    """A tqdm bar fed by the engine's progress(fraction, message) callback: percentage, elapsed time,
    time left at the average rate so far, and the engine's message. It never moves backwards."""

    def __init__(self, desc: str, enabled: bool = True):
        from tqdm import tqdm

        # tqdm puts ", " before a non-empty postfix: here it separates the time from the message.
        self.bar = tqdm(total=1000, desc=desc, disable=bar_disabled(enabled), leave=False, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.n = max(self.bar.n, int(1000 * min(1.0, max(0.0, fraction))))
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def log_as_warnings() -> None:
    """The engine's logged warnings (a library's message, a cleaned-up interrupted run) in our format."""
    import logging

    logger = logging.getLogger("synomaly")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("synomaly: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
