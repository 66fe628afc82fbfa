"""Prefect flows: sweeps of the DVC pipeline over beta schedules and T.

Importing this package (before prefect) turns telemetry off in everything the flows start, and gives
Prefect's temporary server time to start on a small, busy CPU (its default of 20 s is not always enough).
"""

import os

for _key, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "true"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DVC_NO_ANALYTICS", "1"),
                     ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")):
    os.environ.setdefault(_key, _value)
