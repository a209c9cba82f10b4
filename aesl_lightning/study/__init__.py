"""A small library for studies that run as resumable units: `units` (store, deadline-aware runner, machine
records), `schedule` (the same on a pool of worker processes; `--until` times), `stats` (paired, clustered
statistics and verdict rules) and `report` (strict JSON, the invocations' meta record, t-intervals, tables)."""
