"""Grow a tiny Llama inside a Hugging Face ``Trainer`` run: stack its layers at step 10 (exact).

    python examples/train_hf.py [OUTPUT_DIR]

The Trainer keeps its optimizer and learning-rate schedule across the growth; the checkpoint at
step 16 is taken after growth, and the run resumes from it (the model is grown again to the
checkpoint's shape first).
"""

import sys
import tempfile

import torch
import transformers as T

from growcli.train.hf import GrowthCallback
from growcli.train.schedule import AtSteps, Rule, Schedule


def build():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return T.LlamaForCausalLM(cfg)


class Tokens(torch.utils.data.Dataset):
    ids = torch.randint(0, 64, (64, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(model, callback, out):
    args = T.TrainingArguments(output_dir=out, max_steps=24, per_device_train_batch_size=8, learning_rate=3e-3,
                               save_strategy="steps", save_steps=16, report_to=[], use_cpu=True, disable_tqdm=True)
    return T.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])


def schedule():
    return Schedule([Rule(AtSteps((10,)), [{"transform": "stack", "options": {"init": "identity"}}])])


out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
model, example = build(), {"input_ids": Tokens.ids[:2]}
callback = GrowthCallback(schedule(), example)
trainer(model, callback, out).train()
print(f"grown at {[h['step'] for h in callback.history]}: {model.config.num_hidden_layers} layers")

fresh = build()
again = GrowthCallback(schedule(), example)
again.restore(fresh, f"{out}/checkpoint-16")
trainer(fresh, again, out).train(resume_from_checkpoint=f"{out}/checkpoint-16")
print(f"resumed from checkpoint-16 with {fresh.config.num_hidden_layers} layers")
