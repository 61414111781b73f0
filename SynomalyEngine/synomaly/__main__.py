import os
import sys

from synomaly.commands.cli import main
from synomaly.training.distributed import in_team_process

code = main()
if in_team_process():
    # One process of a training team: its work is written and said. It ends here without the exit-time
    # teardown, where a gloo thread still joinable in a C++ static destructor sometimes aborts the
    # process (SIGABRT, "terminate called without an active exception") and fails a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
