"""growcli.grow_: growing a model in the middle of training, with its optimizer.

For each transform: the loss on a fixed batch is the same before and after growth, the next
optimizer step moves unchanged parameters exactly as it would have without growth, and the
optimizer state of replicated units is grown by the weights' own map (checked tensor by tensor).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import growcli
from growcli import zoo
from growcli.core.errors import GrowError

# The MLP cases run in float64 (exact to 1e-10). The Llama cases run in float32, as such models
# are trained: transformers' RMSNorm computes in float32 even inside a float64 model, so float32
# rounding is what a float64 check of a Llama would see anyway.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def mlp_batch(model, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.fc1.in_features, generator=g, dtype=torch.float64)
    return x, torch.randint(0, model.fc3.out_features, (n,), generator=g)


def mlp_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    return T.LlamaForCausalLM(cfg)


def lm_batch(seed=0):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def lm_loss(model, batch):
    return model(**batch).loss


def trained_mlp(optimizer=torch.optim.AdamW, steps=3, **options):
    """A float64 zoo MLP trained ``steps`` steps on a fixed batch: (model, batch, optimizer)."""
    torch.manual_seed(0)
    model = zoo.mlp().double()
    batch = mlp_batch(model)
    opt = optimizer(model.parameters(), lr=1e-2, **options)
    train(model, opt, mlp_loss, batch, steps)
    return model, batch, opt


def train(model, opt, loss_fn, batch, steps=3):
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


def step(model, opt, loss_fn, batch):
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()


CASES = {
    "widen": (zoo.mlp, mlp_batch, mlp_loss, "widen", {"layer": "fc1", "by": 4}),
    "widen-zero": (zoo.mlp, mlp_batch, mlp_loss, "widen", {"layer": "fc2", "by": 3, "init": "zero"}),
    "deepen": (zoo.mlp, mlp_batch, mlp_loss, "deepen", {"after": "fc1"}),
    "heads": (llama, lambda m: lm_batch(), lm_loss, "heads", {"to": 8}),
    "hidden": (llama, lambda m: lm_batch(), lm_loss, "hidden", {"factor": 2.0}),
    "deepen-block": (llama, lambda m: lm_batch(), lm_loss, "deepen", {"after": "model.layers.0", "block": True}),
    "stack": (llama, lambda m: lm_batch(), lm_loss, "stack", {"init": "identity"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_growth_mid_training_keeps_loss_and_untouched_steps(case):
    build, make_batch, loss_fn, transform, options = CASES[case]
    torch.manual_seed(0)
    model = build()
    model = model.double() if build is zoo.mlp else model
    tol = TOL[next(model.parameters()).dtype]
    batch = make_batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    train(model, opt, loss_fn, batch)
    twin, twin_opt = copy.deepcopy((model, opt))  # trains on without growth
    before_ids = {n: id(p) for n, p in model.named_parameters()}
    model.eval()
    loss_before = loss_fn(model, batch).item()
    model.train()
    example = batch[0] if isinstance(batch, tuple) else {"input_ids": batch["input_ids"]}
    report = growcli.grow_(model, transform, opt, example, **options)
    assert model.training
    model.eval()
    assert abs(loss_fn(model, batch).item() - loss_before) <= tol * max(1.0, abs(loss_before))
    model.train()
    assert report.params_after > report.params_before
    kept = [n for n, p in model.named_parameters() if before_ids.get(n) == id(p)]
    if case == "hidden":  # every parameter touches the residual stream: all are mapped, none fresh
        assert not kept and report.optimizer["fresh"] == [] and len(report.optimizer["mapped"]) == len(before_ids)
        return
    assert kept, "growth replaced every parameter"
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    step(model, opt, loss_fn, batch)
    step(twin, twin_opt, loss_fn, batch)
    grown, plain = dict(model.named_parameters()), dict(twin.named_parameters())
    worst = max((grown[n] - plain[n]).abs().max().item() for n in kept if n in plain)
    assert worst <= tol, f"unchanged parameters moved differently after growth: {worst:.3g}"


def test_widen_state_is_grown_by_the_weights_map():
    model, batch, opt = trained_mlp(torch.optim.AdamW)
    old = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for n, p in model.named_parameters()}
    report = growcli.grow_(model, "widen", opt, batch[0], layer="fc1", by=4)
    w_old, st_old = old["fc1.weight"]
    w1 = model.fc1.weight.detach()
    # the channel map g from the weights themselves: every new row is a copy of an old one
    g = [next(j for j in range(w_old.shape[0]) if torch.equal(w1[i], w_old[j])) for i in range(w1.shape[0])]
    assert g[:w_old.shape[0]] == list(range(w_old.shape[0]))
    s1 = opt.state[model.fc1.weight]
    assert torch.equal(s1["exp_avg"], st_old["exp_avg"][g]) and torch.equal(s1["exp_avg_sq"], st_old["exp_avg_sq"][g])
    assert torch.equal(s1["step"], st_old["step"])
    b_old, sb_old = old["fc1.bias"]
    assert torch.equal(opt.state[model.fc1.bias]["exp_avg"], sb_old["exp_avg"][g])
    w2_old, s2_old = old["fc2.weight"]
    share = model.fc2.weight.detach() / w2_old[:, g]  # the split: column j scaled by s_j
    s = share[0]
    assert torch.allclose(share, s.expand_as(share), rtol=0, atol=1e-12)
    s2 = opt.state[model.fc2.weight]
    torch.testing.assert_close(s2["exp_avg"], s2_old["exp_avg"][:, g] * s, rtol=0, atol=1e-15)
    torch.testing.assert_close(s2["exp_avg_sq"], s2_old["exp_avg_sq"][:, g] * s**2, rtol=0, atol=1e-15)
    assert report.optimizer["mapped"] == ["fc1.weight", "fc1.bias", "fc2.weight"] and report.optimizer["fresh"] == []
    assert report.new_mask["fc1.weight"].sum().item() == 4 * w1.shape[1]  # the four copied rows are new


def test_zero_init_units_start_with_zero_state():
    model, batch, opt = trained_mlp(torch.optim.Adam)
    n_old = model.fc2.out_features
    growcli.grow_(model, "widen", opt, batch[0], layer="fc2", by=3, init="zero")
    st = opt.state[model.fc2.weight]
    assert torch.count_nonzero(st["exp_avg"][n_old:]) == 0 and torch.count_nonzero(st["exp_avg_sq"][n_old:]) == 0
    assert torch.count_nonzero(st["exp_avg"][:n_old]) > 0
    st3 = opt.state[model.fc3.weight]  # zero outgoing weights: zero moments for the new columns
    assert torch.count_nonzero(st3["exp_avg"][:, n_old:]) == 0


def test_sgd_momentum_follows_the_map():
    model, batch, opt = trained_mlp(torch.optim.SGD, momentum=0.9)
    m_old = opt.state[model.fc1.weight]["momentum_buffer"].clone()
    w_old = model.fc1.weight.detach().clone()
    growcli.grow_(model, "widen", opt, batch[0], layer="fc1", by=2)
    w1 = model.fc1.weight.detach()
    g = [next(j for j in range(w_old.shape[0]) if torch.equal(w1[i], w_old[j])) for i in range(w1.shape[0])]
    assert torch.equal(opt.state[model.fc1.weight]["momentum_buffer"], m_old[g])


def test_stack_copies_carry_state_and_zeroed_writers_start_fresh():
    model = llama()
    batch = lm_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, lm_loss, batch)
    src = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    report = growcli.grow_(model, "stack", opt, {"input_ids": batch["input_ids"]}, init="identity")
    assert len(model.model.layers) == 4
    st = {n: opt.state.get(p) for n, p in model.named_parameters()}
    # order 0,1,0,1: layers.2 is a copy of layers.0; its o_proj and down_proj are the zeroed writers
    assert torch.equal(st["model.layers.2.self_attn.q_proj.weight"]["exp_avg"], src["model.layers.0.self_attn.q_proj.weight"])
    assert st["model.layers.2.self_attn.o_proj.weight"] is None and st["model.layers.2.mlp.down_proj.weight"] is None
    assert "model.layers.2.mlp.down_proj.weight" in report.optimizer["fresh"]
    assert bool(report.new_mask["model.layers.3.mlp.up_proj.weight"].all())


def test_scheduler_keeps_going():
    torch.manual_seed(0)
    model = zoo.mlp().double()
    batch = mlp_batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        step(model, opt, mlp_loss, batch)
        sched.step()
    lr = opt.param_groups[0]["lr"]
    growcli.grow_(model, "widen", opt, batch[0], layer="fc1", by=2)
    assert opt.param_groups[0]["lr"] == lr and sched.last_epoch == 3
    step(model, opt, mlp_loss, batch)
    sched.step()
    assert opt.param_groups[0]["lr"] == lr * 0.5


def test_failed_growth_leaves_model_and_optimizer_as_they_were():
    model, batch, opt = trained_mlp(torch.optim.AdamW)
    params = {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()}
    state_ids = {id(p) for p in opt.state}
    with pytest.raises(GrowError):
        growcli.grow_(model, [{"transform": "widen", "options": {"layer": "fc1", "by": 2}},
                              {"transform": "widen", "options": {"layer": "nope", "by": 2}}], opt, batch[0])
    now = dict(model.named_parameters())
    assert {n: id(p) for n, p in now.items()} == {n: i for n, (i, _) in params.items()}
    assert all(torch.equal(now[n], v) for n, (_, v) in params.items())
    assert model.fc1.out_features == params["fc1.weight"][1].shape[0]
    assert {id(p) for p in opt.state} == state_ids
    step(model, opt, mlp_loss, batch)  # still trains


def test_unknown_optimizer_state_is_refused():
    model, batch, opt = trained_mlp(torch.optim.Rprop, steps=1)  # per-weight step sizes: not a moment
    ids = [id(p) for p in model.parameters()]
    with pytest.raises(GrowError, match="Rprop's state 'prev'"):
        growcli.grow_(model, "widen", opt, batch[0], layer="fc1", by=2)
    assert [id(p) for p in model.parameters()] == ids  # refused before anything grew


def test_gradmax_units_from_in_memory_data_start_with_zero_incoming_state():
    model, batch, opt = trained_mlp(torch.optim.AdamW)
    x, y = batch
    n_old = model.fc1.out_features
    report = growcli.grow_(model, "widen", opt, x, layer="fc1", by=3, init="gradmax", data={"input": x, "target": y})
    assert report.steps[0]["exact"] and report.steps[0]["verification"]["passed"]
    assert model.fc1.out_features == n_old + 3
    st = opt.state[model.fc1.weight]
    assert torch.count_nonzero(st["exp_avg"][n_old:]) == 0  # zero incoming weights: fresh rows
    assert torch.count_nonzero(st["exp_avg"][:n_old]) > 0


def test_failed_stack_restores_the_config_too():
    model = llama()
    ids = lm_batch()["input_ids"]
    config_id, layers = id(model.config), model.config.num_hidden_layers
    with pytest.raises(GrowError):
        growcli.grow_(model, [{"transform": "stack", "options": {"init": "identity"}},
                              {"transform": "widen", "options": {"layer": "nope", "by": 2}}], None, {"input_ids": ids})
    assert id(model.config) == config_id and model.config.num_hidden_layers == layers == len(model.model.layers)
