"""aesl-lightning: cold-start SFT with the Adaptive Early-Stop Loss, diversity-aware early stopping and GRPO.

The public classes are importable from the package root (loaded on first use, so `import aesl_lightning`
stays cheap): `SFTModule`, `GRPOModule`, `SFTDataModule`, `PromptDataModule`, `HFExport`, `RunSummary`, `DiversityEarlyStopping`, `LoRAConfig`,
`LossConfig`. The sub-packages by layer, lowest first: `ops` (fused kernels), `maths` and `metrics` (pure
functions), `scoring` (answers and rewards), `infra` (models, LoRA, FSDP, generation, export, checkpoints), `data`,
`modules` (the LightningModules), `training` (the callbacks), and the CLI on top (docs/architecture.md). The
flat module names of earlier versions (`aesl_lightning.sft`, ...) are aliases of the new modules (`_compat`).
"""

from importlib import import_module

from aesl_lightning._compat import install

__version__ = "0.1.0"

install()  # the module names before the sub-packages (`aesl_lightning.sft`, ...) stay importable, see _compat

_EXPORTS = {
    "SFTModule": "aesl_lightning.modules.sft",
    "CausalLMModule": "aesl_lightning.modules.lm",
    "GRPOModule": "aesl_lightning.modules.grpo",
    "SFTDataModule": "aesl_lightning.data.datamodule",
    "PromptDataModule": "aesl_lightning.data.datamodule",
    "HFExport": "aesl_lightning.training.callbacks",
    "RunSummary": "aesl_lightning.training.callbacks",
    "DiversityEarlyStopping": "aesl_lightning.training.early_stopping",
    "LoRAConfig": "aesl_lightning.infra.lora",
    "LossConfig": "aesl_lightning.maths.loss_config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aesl_lightning' has no attribute {name!r}")
