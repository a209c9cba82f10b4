import sys, time, json
sys.path.insert(0, "/work/main/experiments"); sys.path.insert(0, "/work/main")
import track_real as T
T.quiet(1)
from aesl_lightning.infra.models import load_causal_lm, load_tokenizer
from aesl_lightning.data.encode import encode_prompt_examples, collate_prompts
from aesl_lightning.data.formats import load_prompt_examples
from aesl_lightning.infra.generation import generate, SamplingConfig
from aesl_lightning.scoring.rewards import math_accuracy, boxed_format
tok = load_tokenizer("smollm2-135m-instruct"); model = load_causal_lm("smollm2-135m-instruct")
ex = load_prompt_examples("/work/main/lightning_logs/track_real/data/test.jsonl")[:16]
enc, _ = encode_prompt_examples(tok, ex, 1024)
b = collate_prompts(enc, tok.pad_token_id)
t = time.perf_counter(); g = generate(model, tok, b["input_ids"], b["attention_mask"], SamplingConfig(1, 0.0, 1.0, 160)); gt = time.perf_counter() - t
print("greedy 16: s", round(gt,1), "tokens", int(g.lengths.sum()), "trunc", int(g.truncated.sum()), flush=True)
t = time.perf_counter(); acc = math_accuracy([None]*16, g.texts, answer=b["answer"]); print("score s", round(time.perf_counter()-t,2), "acc", sum(acc)/16, "boxed", sum(boxed_format([None]*16, g.texts))/16, flush=True)
for x, a in list(zip(g.texts, b["answer"]))[:4]: print("----", a, "|", x[-200:])
