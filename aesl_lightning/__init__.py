"""aesl-lightning: cold-start SFT with the Adaptive Early-Stop Loss, diversity-aware early stopping and GRPO.

The public classes are importable from the package root (loaded on first use, so `import aesl_lightning`
stays cheap): `SFTModule`, `GRPOModule`, `SFTDataModule`, `PromptDataModule`, `HFExport`, `RunSummary`, `DiversityEarlyStopping`, `LoRAConfig`,
`LossConfig`.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "SFTModule": "aesl_lightning.sft",
    "CausalLMModule": "aesl_lightning.lm",
    "GRPOModule": "aesl_lightning.grpo",
    "SFTDataModule": "aesl_lightning.data.datamodule",
    "PromptDataModule": "aesl_lightning.data.datamodule",
    "HFExport": "aesl_lightning.callbacks",
    "RunSummary": "aesl_lightning.callbacks",
    "DiversityEarlyStopping": "aesl_lightning.early_stopping",
    "LoRAConfig": "aesl_lightning.lora",
    "LossConfig": "aesl_lightning.losses",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aesl_lightning' has no attribute {name!r}")
