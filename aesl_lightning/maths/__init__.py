"""The maths, as pure functions with no Lightning and no I/O: the SFT losses (`losses`, over the kernels'
statistics), their gates (`gates`), registry (`loss_registry`), config (`loss_config`) and anchor distributions
(`anchors`); the GRPO objective and advantages (`grpo_loss`); the diversity turning-point rule (`turning_point`).

Imports only `aesl_lightning.ops`."""
