"""``python tests/ddp_script.py fit ...``: the real command line, with the faults of the JSON in
``$GNN_TEST_FAULTS`` (see :mod:`fault_injection`). Lightning's launcher starts this same script
again for every further rank, so each rank gets the faults too."""

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from fault_injection import run_training  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_training(sys.argv[1:], json.loads(os.environ.get("GNN_TEST_FAULTS", "{}"))))
