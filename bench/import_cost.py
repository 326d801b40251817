"""Case 3's breakdown: what importing the daily-sync flow costs beyond importing Prefect.

    python -m bench.import_cost

Prints JSON: seconds to import prefect, then seconds to import what the CLI imports on top
(flows.daily_sync and its tasks, SQLAlchemy, the blocks, prefect-sqlalchemy).
"""

from __future__ import annotations

import importlib
import json
import sys
import time


def main() -> int:
    began = time.perf_counter()
    importlib.import_module("prefect")
    prefect_done = time.perf_counter()
    importlib.import_module("syncpoint.cli")
    importlib.import_module("flows.daily_sync")
    flow_done = time.perf_counter()
    print(json.dumps({"prefect": prefect_done - began, "beyond": flow_done - prefect_done}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
