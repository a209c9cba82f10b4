import sys, time, collections
sys.path.insert(0, "/work/main/experiments"); sys.path.insert(0, "/work/main")
import track_real as T
T.quiet(1)
from aesl_lightning.data.word_problems import WordProblemConfig, generate_split, write_splits
from aesl_lightning.infra.models import load_causal_lm, load_tokenizer
cfg = WordProblemConfig(min_ops=1, max_ops=2)
recs = generate_split("test", 48, cfg, seed=0)
write_splits({"test": recs}, "/tmp/rt/probe3")
tok = load_tokenizer("smollm2-135m-instruct"); model = load_causal_lm("smollm2-135m-instruct")
t = time.perf_counter()
r = T.evaluate_problems(model, tok, "/tmp/rt/probe3/test.jsonl", T.EvalSettings(samples=0, temperature=0.0, max_new_tokens=128, batch_size=48))
print("s", round(time.perf_counter() - t), r["summary"], r["timing"], flush=True)
by = collections.defaultdict(list)
for rec, row in zip(recs, r["rows"]): by[rec["template"]].append(row["greedy_correct"])
print({k: (sum(v), len(v)) for k, v in by.items()})
for rec, row in list(zip(recs, r["rows"]))[:6]: print("----", rec["template"], rec["answer"], "|", row["greedy_text"][-150:].replace("\n", " / "))
