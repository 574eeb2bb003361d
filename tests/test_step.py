"""The minibatch step's forward (``MinibatchStep``) and the gradient clip: the numbers of the loop they replace.

- eager: the objective, the diagnostics and the gradients equal the loss's own output on the same minibatch,
  bit for bit (the same calls in the same order), and a non-finite objective is refused before any gradient;
- compiled: the same to rounding (one compile of a tiny categorical OT loss);
- ``clip_gradients`` equals ``torch.nn.utils.clip_grad_norm_``, bit for bit, clipped or not, one group or two.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import ProbabilisticActor, ValueOperator

from torchrl_ot import DiscreteMetricCost, OTTrustRegionLoss
from torchrl_ot.training import Minibatches, MinibatchStep, clip_gradients

MEANS = ("loss_objective", "loss_critic", "clip_fraction", "ot_active_fraction")  # clip_fraction: not an OT output


def _loss_and_data(seed: int = 0) -> tuple[OTTrustRegionLoss, TensorDict]:
    torch.manual_seed(seed)
    actor = ProbabilisticActor(TensorDictModule(nn.Linear(3, 4), ["observation"], ["logits"]), in_keys=["logits"],
                               distribution_class=torch.distributions.Categorical, return_log_prob=True)
    head = TensorDictModule(nn.Linear(3, 4), ["observation"], ["action_advantage"])
    loss = OTTrustRegionLoss(actor, ValueOperator(nn.Linear(3, 1), in_keys=["observation"]),
                             cost=DiscreteMetricCost(), epsilon=0.05, policy="categorical", advantage_network=head)
    data = TensorDict({"observation": torch.randn(32, 3), "action": torch.randint(4, (32,)),
                       "advantage": torch.randn(32, 1), "value_target": torch.randn(32, 1)}, [32])
    loss.solve_multiplier(data)
    return loss, data


def _objective(out):
    return sum(v for k, v in out.items() if k.startswith("loss_"))


def test_eager_step_is_the_loss_output_on_the_same_minibatch():
    loss, data = _loss_and_data()
    step = MinibatchStep(loss, objective=_objective, means=MEANS)
    torch.manual_seed(1)
    value, means = step(Minibatches(data, 8))
    torch.manual_seed(1)
    out = loss(Minibatches(data, 8).sample())  # the same permutation draw
    assert step.keys == ("loss_objective", "loss_critic", "ot_active_fraction")
    assert torch.equal(value, _objective(out))
    assert torch.equal(means, torch.stack([out[k] for k in step.keys]))
    assert not means.requires_grad and value.requires_grad


def test_eager_step_refuses_a_non_finite_objective_before_any_gradient():
    loss, data = _loss_and_data()
    step = MinibatchStep(loss, objective=lambda out: _objective(out) * float("inf"), means=MEANS)
    with pytest.raises(FloatingPointError, match="non-finite minibatch loss"):
        step(Minibatches(data, 8))
    assert all(p.grad is None for p in loss.parameters())


def test_step_refuses_bad_arguments():
    loss, _ = _loss_and_data()
    with pytest.raises(TypeError, match="loss_module must be a torchrl LossModule"):
        MinibatchStep(nn.Linear(2, 2), objective=_objective, means=MEANS)
    with pytest.raises(TypeError, match="objective must be a callable"):
        MinibatchStep(loss, objective="loss_objective", means=MEANS)
    with pytest.raises(TypeError, match="means must be a sequence of output keys"):
        MinibatchStep(loss, objective=_objective, means="loss_objective")


def test_compiled_step_equals_eager_to_rounding():
    loss, data = _loss_and_data()
    results = {}
    for compiled in (False, True):
        step = MinibatchStep(loss, objective=_objective, means=MEANS, compile=compiled)
        torch.manual_seed(2)
        rb = Minibatches(data, 8)
        values, grads = [], []
        for _ in range(3):  # three minibatches of one permutation: the index is an input of the graph
            for p in loss.parameters():
                p.grad = None
            value, means = step(rb)
            value.backward()
            values.append(torch.cat([value.detach().reshape(1), means]))
            grads.append(torch.cat([p.grad.reshape(-1) for p in loss.parameters() if p.grad is not None]))
        results[compiled] = (step.keys, torch.stack(values), torch.stack(grads))
    (keys_e, values_e, grads_e), (keys_c, values_c, grads_c) = results[False], results[True]
    assert keys_e == keys_c
    torch.testing.assert_close(values_c, values_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_c, grads_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # under and over the norm
@pytest.mark.parametrize("two_groups", [False, True])
def test_clip_gradients_equals_clip_grad_norm_bit_for_bit(scale, two_groups):
    torch.manual_seed(3)
    shapes = [(64, 17), (64,), (64, 64), (6,)]
    grads = [torch.randn(s) * scale for s in shapes]
    ours = [nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    split = (lambda ps: [ps[:2], ps[2:]]) if two_groups else (lambda ps: [ps])
    total = clip_gradients(split(ours), 0.5)
    norms = [torch.nn.utils.clip_grad_norm_(group, 0.5) for group in split(theirs)]
    expected = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    assert torch.equal(total, expected)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))
