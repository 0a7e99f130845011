"""`lofa.optimise.one_cycle`, the loop the evaluators and the condition encoders share: clipping only when asked,
a non-finite loss or gradient norm stopped before the weights, and the plain AdamW + one-cycle loop's numbers."""
import pytest
import torch

from lofa.errors import LofaError
from lofa.optimise import one_cycle

pytestmark = pytest.mark.usefixtures("one_thread")


def _seen_gradients(clip):
    """The gradient each step's optimizer step used, of a loss 100 · w (gradient 100, norm 100).

    one_cycle zeroes the gradients only after drawing the next loss, so step s + 1's loss_fn sees step s's (clipped)
    gradient.
    """
    net = torch.nn.Linear(1, 1, bias=False)
    seen = []

    def loss_fn(step):
        if step > 0:
            seen.append(float(net.weight.grad))
        return 100 * net.weight.sum()

    one_cycle(net, loss_fn, 4, lr=1e-3, weight_decay=0.0, clip=clip, what="test", fix="lower it", desc="test",
              progress=False)
    return seen


def test_no_clip_leaves_the_gradients_as_they_are_and_a_clip_scales_them_down():
    assert _seen_gradients(None) == [100.0] * 3
    assert _seen_gradients(1.0) == pytest.approx([1.0] * 3)


def test_a_nan_loss_stops_before_the_optimizer_step():
    net = torch.nn.Linear(2, 1)
    before = {}

    def loss_fn(step):
        if step == 2:
            before.update({k: v.clone() for k, v in net.state_dict().items()})
            return net(torch.ones(1, 2)).sum() * float("nan")
        return net(torch.ones(1, 2)).square().sum()

    with pytest.raises(LofaError, match=r"^toy loss is nan at step 3 and there is no checkpoint to resume from; "
                                        r"lower it and rerun$"):
        one_cycle(net, loss_fn, 5, lr=1e-2, weight_decay=0.0, clip=None, what="toy", fix="lower it", desc="toy",
                  progress=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_inf_gradient_under_a_finite_loss_stops_without_clipping_too():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.zero_()

    def loss_fn(step):
        return net.weight.sum().sqrt()  # 0 at w = 0, with an infinite gradient

    with pytest.raises(LofaError, match=r"^toy gradient norm is inf at step 1"):
        one_cycle(net, loss_fn, 3, lr=1e-2, weight_decay=0.0, clip=None, what="toy", fix="lower it", desc="toy",
                  progress=False)
    assert float(net.weight.detach()) == 0.0


@pytest.mark.parametrize("clip", [None, 1.0])
def test_the_loop_is_adamw_under_one_cycle_step_for_step(clip):
    """The loop the evaluators and the condition encoders each wrote before they shared one_cycle."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def batch(step):
        g = torch.Generator().manual_seed(step)
        return torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)

    steps, lr = 30, 1e-2
    reference = make()
    opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    ref_losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = (reference(x) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        opt.step()
        sched.step()
        ref_losses.append(loss.item())

    net = make()

    def loss_fn(step):
        x, y = batch(step)
        return (net(x) - y).square().mean()

    losses = one_cycle(net, loss_fn, steps, lr=lr, weight_decay=1e-4, clip=clip, what="toy", fix="lower it",
                       desc="toy", progress=False)
    assert losses == ref_losses
    for a, b in zip(reference.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    assert not net.training
