"""`python -m aesl_lightning`: LightningCLI (fit / validate / test / predict) plus two tool subcommands.

    python -m aesl_lightning fit --config experiments/quickstart.yaml --trainer.max_steps 50
    python -m aesl_lightning fit --model aesl_lightning.SFTModule --print_config
    python -m aesl_lightning synthetic --num-examples 500 --out data.jsonl
    python -m aesl_lightning export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out my-model

The model and data classes are chosen in the config (`model.class_path`, `data.class_path`), so one entry
point runs every stage. Defaults: `aesl_lightning.SFTModule` and `aesl_lightning.SFTDataModule`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path



def make_cli(args: list[str] | None, run: bool = True):
    """Build (and by default run) the LightningCLI. Imported lazily: the tool subcommands start fast."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class AESLCLI(LightningCLI):
        """LightningCLI with the toolkit's defaults: SFT model and data, seed 0, TensorBoard in lightning_logs/."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.set_defaults(
                {
                    "model": {"class_path": "aesl_lightning.sft.SFTModule"},
                    "data": {"class_path": "aesl_lightning.data.datamodule.SFTDataModule"},
                }
            )

    return AESLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # each module configures its own optimiser and schedule
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "aesl-lightning: cold-start SFT (AESL), diversity early stopping and GRPO."},
        args=args,
        run=run,
    )


def export_main(argv: list[str]) -> Path:
    """`export`: turn a Lightning checkpoint written by this toolkit into a Hugging Face model folder."""
    parser = argparse.ArgumentParser(
        prog="python -m aesl_lightning export",
        description="Export a checkpoint written by aesl-lightning in Hugging Face format (model + tokenizer).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by an aesl-lightning run.")
    parser.add_argument("--out", required=True, help="Output folder: new, empty or a previous export (replaced atomically).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace --out even if it holds files that are not a previous export (they are deleted).")
    parser.add_argument("--no-merge-lora", action="store_true", help="Save LoRA adapters separately instead of merging.")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Allow a checkpoint whose model needs trust_remote_code (runs the model repository's code).")
    args = parser.parse_args(argv)
    from aesl_lightning.lm import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out, merge_lora=False if args.no_merge_lora else None,
                            overwrite=True if args.overwrite else None, trust_remote_code=args.trust_remote_code)
    print(f"Exported {args.ckpt} -> {out}")
    return out


def _configure_logging() -> None:
    """Show the toolkit's INFO messages (examples loaded, dropped, exported) without touching other loggers."""
    logger = logging.getLogger("aesl_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s aesl_lightning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` defaults to the command line."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    _configure_logging()
    if argv and argv[0] == "synthetic":
        from aesl_lightning.data.synthetic import main as synthetic_main

        synthetic_main(argv[1:])
        return
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    make_cli(None if from_command_line else argv)
