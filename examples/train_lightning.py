"""Grow an MLP inside a PyTorch Lightning run: widen ``fc1`` at step 8 (exact), optimizer carried.

    python examples/train_lightning.py [OUTPUT_DIR]
"""

import sys
import tempfile

import lightning.pytorch as L
import torch

from growcli import zoo
from growcli.train.lightning import LightningGrowth
from growcli.train.schedule import AtSteps, Rule, Schedule


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = zoo.mlp()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


torch.manual_seed(0)
x = torch.randn(128, 16)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=16)
growth = LightningGrowth(Schedule([Rule(AtSteps((8,)), [{"transform": "widen", "options": {"layer": "fc1", "by": 16}}])]),
                         example_inputs=x[:4], module="model")
module = Classifier()
trainer = L.Trainer(max_steps=24, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(), callbacks=[growth])
trainer.fit(module, data)
print(f"grown at {[h['step'] for h in growth.history]}: fc1 has {module.model.fc1.out_features} units")
