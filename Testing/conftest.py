"""Fixtures shared by several test files: the shared BraTS data folder and one phantom case on disk."""
import signal
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data lives outside the repository (it cannot be redistributed); CI mounts it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"BraTS data not found at {SHARED_DATA}; CI provides it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def liver_data(shared_data) -> Path:
    """The three liver CTs with their masks (../shared/data/liver-ct: ircad17, lits117, totalseg-example)."""
    folder = shared_data / "liver-ct"
    missing = [name for name in ("ircad17", "lits117", "totalseg-example") if not (folder / name / "ct.nii.gz").exists()]
    if missing:
        pytest.skip(f"liver CT data not found in {folder} ({', '.join(missing)})")
    return folder


@pytest.fixture(scope="session")
def phantom_case(tmp_path_factory):
    """A lesion phantom written once per session: {"flair", "brainmask", "seg"} -> path.

    Tests must not modify these files (several tests check that inputs stay untouched).
    """
    from synomaly.evaluation.phantom import write_phantom_case

    return write_phantom_case(tmp_path_factory.mktemp("phantom") / "case", seed=5, lesion=True)


def pytest_configure(config):
    # Children inherit an ignored SIGINT (a CI runner or a script started in the background ignores it), and
    # Python then never turns Ctrl-C into KeyboardInterrupt: the tests that stop a child with SIGINT would
    # depend on their caller. With a handler here, every child starts with Python's own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "slow: takes more than about 20 s on 2 CPU cores; "
                            "`-m \"not slow\"` leaves it out for everyday runs (CI runs everything)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (CI has none)")
