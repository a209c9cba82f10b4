"""The real-model study (plan amendment 1, issue 22) as units on `aesl_lightning.study`: SmolLM2-135M-Instruct on the
word problems. `study` (unit list, scheduling from records, dispatch), `stages` (each stage through the toolkit),
`evaluate` (per-problem rows), `operations` (computation paths), `rules` (snapshot choices, turning point),
`analysis` (pilot and verdicts, pure), `report` and `figures` (from the unit files alone)."""
