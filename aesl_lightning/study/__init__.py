"""A small library for studies that run as resumable units: `units` (store, deadline-aware runner, machine
records) and `stats` (paired, clustered statistics and verdict rules)."""
