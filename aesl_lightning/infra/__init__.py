"""Models and infrastructure: loading causal LMs and tokenizers (`models`, `tiny`), LoRA (`lora`), FSDP (`fsdp`),
generation (`generation`), Hugging Face export (`export`, `export_folder`), atomic checkpoints and the names a
checkpoint may import (`checkpoint_io`), resumable random state (`rng_state`), collectives (`distributed`).
No LightningModule here; imports `ops`, `maths`, `metrics`, `scoring` at most."""
