"""The reproduction of the paper's pipeline (experiments/reproduce.py) over the study library: `config` (tracks from
experiments/reproduce.yaml, folders), `stages` (data, base, SFT, GRPO, evaluation), `study` (units, choices, the
worker), `ablation`, `analysis` (numbers from records), `report` and `figures`."""
