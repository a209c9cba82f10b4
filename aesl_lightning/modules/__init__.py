"""The LightningModules and what wires them: the shared base (`lm`), cold-start SFT (`sft`, with the step-0 gate
`calibration`), GRPO (`grpo`, `grpo_config`, `rollout`), validation by generation (`evaluation`,
`sample_metrics`) and reading checkpoints safely (`checkpoint_load`). Imports the layers below, never `training`
or the CLI."""
