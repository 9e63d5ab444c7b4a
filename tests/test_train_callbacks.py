"""Growth inside real training loops: a transformers Trainer and a Lightning Trainer grow mid-run,
train to the end, checkpoint after growth and resume from that checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T

from growcli import zoo
from growcli.train.loop import Grower, replay_growth
from growcli.train.schedule import AtSteps, Plateau, Rule, Schedule



# --------------------------------------------------------------------------- transformers.Trainer
def tiny_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    return T.LlamaForCausalLM(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(model, callback, out, max_steps):
    from growcli.train.hf import GrowthCallback  # noqa: F401  (imported by the caller too)

    args = T.TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="linear",
                               save_strategy="steps", save_steps=8, logging_steps=100, report_to=[], use_cpu=True,
                               disable_tqdm=True, seed=0)
    return T.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])


def test_trainer_grows_mid_run_and_resumes_after_growth(tmp_path):
    from growcli.train.hf import STATE_FILE, GrowthCallback

    example = {"input_ids": Tokens().ids[:2]}
    schedule = lambda: Schedule([Rule(AtSteps((4,)), [{"transform": "stack", "options": {"init": "identity"}}])])  # noqa: E731
    model = tiny_llama()
    callback = GrowthCallback(schedule(), example)
    trainer = trainer_for(model, callback, tmp_path / "run", 12)
    result = trainer.train()
    assert trainer.state.global_step == 12 and math.isfinite(result.training_loss)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert [h["step"] for h in callback.history] == [4]
    grown = {id(p) for p in model.parameters()}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == grown
    ckpt = tmp_path / "run" / "checkpoint-8"
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["history"][0]["params_after"] > state["history"][0]["params_before"]

    # resume from the post-growth checkpoint: a fresh original model grows to the checkpoint's shape
    fresh = tiny_llama()
    again = GrowthCallback(schedule(), example)
    again.restore(fresh, ckpt)
    assert len(fresh.model.layers) == 4
    resumed = trainer_for(fresh, again, tmp_path / "run", 12)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 12
    assert len(again.history) == 1  # the growth at step 4 is not repeated
    assert len(fresh.model.layers) == 4


# --------------------------------------------------------------------------- Lightning
import lightning.pytorch as L  # noqa: E402  (the [train] and [dev] extras install it)


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = zoo.mlp()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5)}


def loader():
    g = torch.Generator().manual_seed(0)
    m = zoo.mlp()
    x = torch.randn(64, m.fc1.in_features, generator=g)
    y = torch.randint(0, m.fc3.out_features, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def lightning_trainer(tmp_path, callback, max_steps):
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accumulate_grad_batches=2, callbacks=[callback, ckpt],
                     default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0)


def test_lightning_grows_mid_run_and_resumes_after_growth(tmp_path):
    from growcli.train.lightning import LightningGrowth

    x = next(iter(loader()))[0]
    schedule = lambda: Schedule([Rule(AtSteps((4,)), [{"transform": "widen", "options": {"layer": "fc1", "by": 4}}])])  # noqa: E731
    module = Classifier()
    width = module.model.fc1.out_features
    growth = LightningGrowth(schedule(), x, module="model")
    trainer = lightning_trainer(tmp_path, growth, 12)
    trainer.fit(module, loader())
    assert trainer.global_step == 12 and module.model.fc1.out_features == width + 4
    assert [h["step"] for h in growth.history] == [4]
    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    fresh = Classifier()
    again = LightningGrowth(schedule(), x, module="model")
    resumed = lightning_trainer(tmp_path / "again", again, 16)
    resumed.fit(fresh, loader(), ckpt_path=str(ckpts[0]))  # the step-8 checkpoint, after growth
    assert resumed.global_step == 16 and fresh.model.fc1.out_features == width + 4
    assert len(again.history) == 1


# --------------------------------------------------------------------------- plain loop
def test_plain_loop_plateau_growth_and_replay():
    torch.manual_seed(0)
    model = zoo.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = next(iter(loader()))
    grower = Grower(model, opt, Schedule([Rule(Plateau(patience=2), [{"transform": "widen",
                                                                       "options": {"layer": "fc1", "by": 2}}], times=1)]), x)
    flat = [1.0, 0.9, 0.9, 0.9, 0.9]
    for step, val in enumerate(flat, 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        grower.step(step, val_loss=val)
    assert [h["step"] for h in grower.history] == [4]
    state = json.loads(json.dumps(grower.state_dict()))
    rebuilt = replay_growth(zoo.mlp(), state)
    assert rebuilt.fc1.weight.shape == model.fc1.weight.shape
    rebuilt.load_state_dict(model.state_dict())  # strict: the replayed architecture holds the weights


# --------------------------------------------------------------------------- the examples run
@pytest.mark.parametrize("example", ["train_loop.py", "train_hf.py", "train_lightning.py"])
def test_training_examples_run(example, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / example
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "grown at [" in proc.stdout or "grew" in proc.stdout, proc.stdout
