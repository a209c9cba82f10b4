"""The Lightning callbacks of a run: the step progress bar (`progress`), the validation schedule
(`val_schedule`), early stopping at the diversity turning point (`early_stopping`, `peak_checkpoint`), export
and the end-of-run summary (`callbacks`) and the diversity figure (`plots`). May import the modules; the CLI
sits above."""
