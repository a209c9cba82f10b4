"""Share of completion tokens each loss learns at step 0 on the CPU track's cold-start set, under its pre-trained base.

    python experiments/cpu_track_step0.py     # -> experiments/results/aesl-variants/cpu_track_step0.json
"""
import json
import sys
import tempfile
from pathlib import Path
sys.path[:0] = ["experiments", "."]
from reproduction import config, stages
from aesl_lightning import LossConfig, SFTModule, SFTDataModule
from aesl_lightning.maths.losses import learned_share
from aesl_lightning.modules.calibration import measure
from aesl_lightning.modules.evaluation import ValidationGeneration
track = config.load_tracks()[0]["cpu"]
work = Path(tempfile.mkdtemp())
paths = config.Paths(Path("experiments/results/cpu"), work)
(paths.data).mkdir(parents=True)
info = stages.make_data(track, paths)
rec = paths.store.load("data")["result"]
print("digest match:", info["sha256"]["coldstart"] == rec["sha256"]["coldstart"])
module = SFTModule(name_or_path="experiments/results/cpu/base_model", loss=LossConfig(name="ce"), val_generation=ValidationGeneration(num_prompts=0))
data = SFTDataModule(train=str(paths.data / "coldstart.jsonl"), batch_size=8, max_length=512, val_size=0)
data.attach_tokenizer(module.tokenizer)
data.setup("fit")
views = measure(module, data.train_dataloader(), with_base=True)
out = {}
for name, tau in [("aesl_v1", 0.7), ("aesl_v1", 0.9), ("aesl_v1", 0.97), ("aesl", 0.9), ("aesl", 0.97), ("aesl_anchor", 0.9), ("aesl_entropy_floor", 0.9), ("aesl_drift", 0.9), ("dft", 0.9)]:
    share, total = learned_share(LossConfig(name=name, tau_tok=tau, tau_seq=tau), views)
    print(name, tau, f"{share:.4f}", round(share*total), total)
    out[f"{name}@{tau}"] = {"learned_share": share, "learned": round(share * total), "completion_tokens": total}
import torch  # noqa: E402

p = torch.cat([v.logprob[v.mask].exp() for v in views])
print("mean p_t", float(p.mean()))
out["mean_p_t_step0"] = float(p.mean())
Path("experiments/results/aesl-variants/cpu_track_step0.json").write_text(json.dumps(out, indent=2))
