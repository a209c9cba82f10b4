"""Scoring completions: final answers and their values (`answers`, `answer_values`), the sandboxed symbolic
verifier (`verifier`) and the TRL-style reward functions (`rewards`). Imports nothing else of the package."""
