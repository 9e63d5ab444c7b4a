"""Grow an MLP during a plain PyTorch training loop, with the optimizer carried.

    python examples/train_loop.py

Trains growcli's reference MLP on a synthetic task; at 25% and 50% of training the schedule
widens ``fc1`` (Net2Net, exact), and a plateau of the validation loss would widen ``fc2``.
"""

import torch

from growcli import zoo
from growcli.train.loop import Grower
from growcli.train.schedule import AtSteps, Plateau, Rule, Schedule

STEPS = 200
torch.manual_seed(0)
model = zoo.mlp()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
x = torch.randn(256, 16)
y = (x[:, :4] * x[:, 4:8]).argmax(1)
x_val, y_val = x[:64], y[:64]

schedule = Schedule([
    Rule(AtSteps((0.25, 0.5)), [{"transform": "widen", "options": {"layer": "fc1", "factor": 1.5}}]),
    Rule(Plateau(patience=5, min_delta=1e-3), [{"transform": "widen", "options": {"layer": "fc2", "by": 8}}], times=1),
], budget_params=20_000)
grower = Grower(model, optimizer, schedule, example_inputs=x_val, total_steps=STEPS)

for step in range(1, STEPS + 1):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x[64:]), y[64:]).backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        val = torch.nn.functional.cross_entropy(model(x_val), y_val).item() if step % 10 == 0 else None
    for report in grower.step(step, val_loss=val):
        print(f"step {step}: grew {report.params_before:,} → {report.params_after:,} parameters; "
              f"optimizer {report.optimizer['mapped']} mapped, {len(report.optimizer['fresh'])} fresh")
print(f"done: fc1 {model.fc1.out_features} units, fc2 {model.fc2.out_features}, history {[h['step'] for h in grower.history]}")
