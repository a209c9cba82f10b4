"""A track's settings (`Track`, loaded from experiments/reproduce.yaml), its folders (`Paths`) and the check that
finished units are resumed only under the same settings."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path

from aesl_lightning.study.report import read_json, write_json
from aesl_lightning.study.units import UnitStore

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "reproduce.yaml"


@dataclass(frozen=True)
class Task:
    """The arithmetic task family (see aesl_lightning.data.synthetic.ArithmeticConfig)."""

    min_digits: int = 1
    max_digits: int = 1
    mul_max_digits: int = 1
    min_steps: int = 1
    max_steps: int = 2
    phrasings: tuple[str, ...] = ("expression", "instructions")

    def config(self, **overrides):
        from aesl_lightning.data.synthetic import ArithmeticConfig

        return ArithmeticConfig(**{**dataclasses.asdict(self), **overrides})


@dataclass(frozen=True)
class Track:
    """Every size and hyper-parameter of one track (values: experiments/reproduce.yaml); `smoke()` shrinks it."""

    name: str
    base_model: str | None  # None: pre-train a Llama-style model with a character tokenizer from scratch
    hidden_size: int  # the from-scratch base model
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    task: Task  # cold start, RL, validation and the in-distribution test
    hard_task: Task  # the harder test split
    pretrain_task: Task  # the pre-training corpus (all three solution styles)
    coldstart_style: str
    num_pretrain: int
    num_coldstart: int
    num_val: int
    num_rl: int
    num_test: int
    num_test_hard: int
    pretrain_steps: int
    pretrain_lr: float
    pretrain_batch: int
    sft_epochs: int
    sft_lr: float
    sft_batch: int
    val_every_epochs: int
    val_prompts: int
    val_samples: int
    max_new_tokens: int
    aesl_taus: tuple[float, ...]  # the AESL threshold sweep (tau_tok = tau_seq), chosen on validation
    turning_point_patience: int
    lora_rank: int | None
    grpo_steps: int
    grpo_prompts: int
    num_generations: int
    grpo_lr: float
    beta: float
    eval_samples: int  # k of pass@k after RL
    sweep_grpo_steps: int  # GRPO steps from each validation snapshot of the seed-0 CE run
    sweep_every: int  # every n-th snapshot
    seeds: tuple[int, ...]
    data_seed: int

    def smoke(self) -> Track:
        """Every stage for a step or two on tiny sets; a real base model (GPU track) gets one seed and one AESL
        threshold so that the smoke run stays within minutes on a CPU."""
        real = self.base_model is not None
        return replace(
            self,
            name=f"{self.name}-smoke",
            hidden_size=min(self.hidden_size, 32), num_layers=min(self.num_layers, 2), intermediate_size=64,
            num_pretrain=64, num_coldstart=16, num_val=8, num_rl=16, num_test=8, num_test_hard=8,
            pretrain_steps=4, sft_epochs=4, sft_batch=8, val_prompts=4, val_samples=2, max_new_tokens=24,
            aesl_taus=self.aesl_taus[: 1 if real else 2], grpo_steps=2, grpo_prompts=2, num_generations=2, eval_samples=2,
            sweep_grpo_steps=1, sweep_every=2 if real else 1, seeds=self.seeds[: 1 if real else 2],
            val_every_epochs=2,
        )

    @property
    def smoke_run(self) -> bool:
        return self.name.endswith("smoke")


def _typed(path: Path, where: str, field: dataclasses.Field, value):
    """`value` as `field`'s type (YAML lists as tuples, ints as floats); anything else is an error naming the field."""
    kind = str(field.type)
    if kind == "Task":
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {where}.{field.name}: expected a mapping of Task fields, found {value!r}")
        unknown = set(value) - {f.name for f in dataclasses.fields(Task)}
        if unknown:
            raise ValueError(f"{path}: {where}.{field.name}: unknown Task fields {sorted(unknown)}")
        return Task(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    if kind.startswith("tuple"):
        if not isinstance(value, list):
            raise ValueError(f"{path}: {where}.{field.name}: expected a list, found {value!r}")
        return tuple(float(v) if "float" in kind and isinstance(v, int) else v for v in value)
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool), "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}
    base = kind.split(" | ")[0]
    if value is None and "None" in kind:
        return None
    if base in ok and not ok[base](value):
        raise ValueError(f"{path}: {where}.{field.name}: expected {kind}, found {value!r} ({type(value).__name__}; "
                         "YAML reads 3e-3 as text: write 3.0e-3)")
    return float(value) if base == "float" else value


def load_tracks(path: str | Path = DEFAULT_CONFIG) -> tuple[dict[str, Track], dict[str, dict[str, float]]]:
    """The tracks of the YAML at `path` (every Track field, no other) and the per-kind cost estimates by track name."""
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or "estimates" not in raw:
        raise ValueError(f"{path}: expected a mapping of tracks and an `estimates` section")
    fields = [f for f in dataclasses.fields(Track) if f.name != "name"]
    tracks = {}
    for name, values in raw.items():
        if name == "estimates":
            continue
        missing, unknown = {f.name for f in fields} - set(values), set(values) - {f.name for f in fields}
        if missing or unknown:
            raise ValueError(f"{path}: track {name!r}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        tracks[name] = Track(name=name, **{f.name: _typed(path, name, f, values[f.name]) for f in fields})
    return tracks, raw["estimates"]


class Paths:
    """`out`: the unit records (`<out>/units/`), reports and the base model's weights; `work`: data, weights, logs."""

    def __init__(self, out: str | Path, work: str | Path) -> None:
        self.out, self.work = Path(out), Path(work)
        self.store = UnitStore(self.out)
        self.data = self.work / "data"
        self.base = self.work / "base" / "hf_model"
        self.base_copy = self.out / "base_model"  # the pre-trained weights kept with the results (a few MB): runs resume anywhere

    def run_dir(self, unit_id: str) -> Path:
        """A unit's folder under `work`: `sft-ce-s0` -> `<work>/sft/ce-s0`."""
        return self.work.joinpath(*unit_id.split("-", 1))


def check_same_track(track: Track, paths: Paths) -> None:
    """Resume only units made with this very configuration: `<out>/track.json` records it on the first call."""
    config = json.loads(json.dumps(dataclasses.asdict(track)))
    recorded = paths.out / "track.json"
    if recorded.is_file() and read_json(recorded) != config:
        changed = sorted(k for k in config if read_json(recorded).get(k) != config[k])
        raise SystemExit(f"{recorded}: the finished units in {paths.out} were made with a different configuration (changed: "
                         f"{', '.join(changed)}); pass another --out/--work or delete both folders to start over")
    write_json(recorded, config)
