"""What ITK, GDCM and nibabel print while reading or writing a file: captured, cleaned, and turned into our
errors or into warnings (a detection report's ``warnings``, or the log), never raw lines on the terminal."""
import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import List, Optional

_ITK_WARNING = re.compile(r"^\s*WARNING: In .*, line \d+\s*$")
_ITK_OBJECT = re.compile(r"^\s*\w+ \(0x[0-9a-fA-F]+\):\s*")
log = logging.getLogger(__name__)


def last_line(exc: BaseException) -> str:
    """ITK errors span several lines (source file, object address, ...); the last one says what failed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _library_lines(text: str) -> List[str]:
    """What ITK, GDCM or niftilib printed, one entry per message, without source-file lines and addresses."""
    messages, current = [], []
    for line in text.splitlines():
        if _ITK_WARNING.match(line) or not line.strip():
            if current:
                messages.append(" ".join(current))
            current = []
            continue
        current.append(_ITK_OBJECT.sub("", line.strip()))
    if current:
        messages.append(" ".join(current))
    return messages


@contextlib.contextmanager
def library_messages(sink: List[str]):
    """Catch what C++ libraries (ITK, GDCM, niftilib) print on the process's stderr, and Python warnings,
    into ``sink`` instead of the user's terminal: they become our errors or report warnings.

    Works on file descriptor 2, since the libraries write there directly; where it cannot be
    redirected (no console), ITK's warning display is switched off instead.
    """
    import SimpleITK as sitk

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        saved = None
    display = sitk.ProcessObject.GetGlobalWarningDisplay()
    if saved is None:
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    capture = tempfile.TemporaryFile() if saved is not None else None
    try:
        if capture is not None:
            os.dup2(capture.fileno(), 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(display)
        if capture is not None:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            sink.extend(_library_lines(capture.read().decode("utf-8", "replace")))
            capture.close()
    sink.extend(str(w.message) for w in caught)


def report(notes: Optional[List[str]], messages) -> None:
    """Warnings go into the caller's list (a detection report), or to the log when it keeps none."""
    for message in messages:
        if notes is None:
            log.warning(message)
        else:
            notes.append(message)
