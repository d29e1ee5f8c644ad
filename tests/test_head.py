"""Oracle tests for the DINO projection head."""

import pytest
import torch
from torch import nn

from dino_nb.model import Head


def make_head(**kwargs) -> Head:
    torch.manual_seed(0)
    kw = dict(
        in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=6, n_layers=3, norm_last_layer=False
    )
    kw.update(kwargs)
    return Head(**kw)


def row_norms(head: Head) -> torch.Tensor:
    return torch.linalg.vector_norm(head.last_layer.weight, dim=1)  # (out_dim,)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_output_shape_and_layer_count(n_layers):
    head = make_head(n_layers=n_layers)
    assert head(torch.randn(5, 12)).shape == (5, 20)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == n_layers
    assert linears[0].in_features == 12 and linears[-1].out_features == 6
    if n_layers > 1:
        assert all(m.out_features == 16 for m in linears[:-1])
        assert sum(isinstance(m, nn.GELU) for m in head.mlp.modules()) == n_layers - 1


@pytest.mark.parametrize("n_layers", [0, -1])
def test_no_layers_raises(n_layers):
    with pytest.raises(ValueError, match="n_layers"):
        make_head(n_layers=n_layers)


def test_forward_is_mlp_then_l2_normalise_then_weight_normalised_linear():
    head = make_head()
    with torch.no_grad():
        head.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(4, 12, dtype=torch.float64)
    head = head.double()
    z = head.mlp(x)
    z = z / torch.sqrt((z**2).sum(dim=1, keepdim=True))  # (4, bottleneck)
    g, v = head.weight_g, head.weight_v  # (out, 1), (out, bottleneck)
    w = g * v / torch.sqrt((v**2).sum(dim=1, keepdim=True))
    torch.testing.assert_close(head.last_layer.weight, w)
    torch.testing.assert_close(head(x), z @ w.T)


def test_last_layer_parameters_and_state_dict_keys():
    head = make_head()
    assert head.weight_g.shape == (20, 1) and head.weight_v.shape == (20, 6)
    assert head.last_layer.bias is None
    keys = set(head.state_dict())
    assert {
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    } <= keys
    # g starts at 1 whatever norm_last_layer says (as the official code does)
    for norm in (False, True):
        h = make_head(norm_last_layer=norm)
        torch.testing.assert_close(h.weight_g, torch.ones(20, 1))
        torch.testing.assert_close(row_norms(h), torch.ones(20))


def test_mlp_init_zero_biases():
    head = make_head()
    for m in head.mlp.modules():
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
            assert m.weight.std() < 0.05


def step(head: Head, lr: float = 0.5) -> None:
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=lr)
    x = torch.randn(8, 12)
    loss = (head(x) * torch.randn(8, 20)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_norm_last_layer_keeps_norm_one_and_g_frozen():
    head = make_head(norm_last_layer=True)
    assert head.norm_last_layer
    assert not head.weight_g.requires_grad and head.weight_v.requires_grad
    g0, v0 = head.weight_g.detach().clone(), head.weight_v.detach().clone()
    for _ in range(3):
        step(head)
    assert head.weight_g.grad is None
    assert torch.equal(head.weight_g, g0)
    assert not torch.allclose(head.weight_v, v0)
    torch.testing.assert_close(row_norms(head), torch.ones(20))


def test_without_norm_last_layer_g_is_trained():
    head = make_head(norm_last_layer=False)
    assert head.weight_g.requires_grad
    g0 = head.weight_g.detach().clone()
    step(head)
    assert head.weight_g.grad is not None
    assert not torch.allclose(head.weight_g, g0)
    # ||g v / ||v|| || = |g|: a g that a step pushed below 0 flips its row, keeps the norm
    torch.testing.assert_close(row_norms(head), head.weight_g.detach().abs().squeeze(1))


def test_batchnorm_after_each_hidden_linear_as_the_official_head():
    head = Head(16, 10, hidden_dim=32, bottleneck_dim=8, n_layers=3, use_bn=True)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.GELU,
        nn.Linear,
        nn.BatchNorm1d,
        nn.GELU,
        nn.Linear,
    ]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in Head(16, 10, n_layers=3).mlp.modules())


def test_batchnorm_lets_small_differences_between_images_reach_the_prototypes():
    """Embeddings that share a large common part (a fresh backbone's) give near-equal outputs,
    unless the head standardises each feature over the batch."""
    torch.manual_seed(0)
    common = torch.randn(1, 64) * 10
    x = common + 0.01 * torch.randn(32, 64)  # (32, 64): 32 images, nearly the same embedding

    def spread(head: nn.Module) -> float:
        head.train()
        logits = head(x)  # (32, K)
        return (logits - logits.mean(0)).std().item()  # how much the images differ

    plain = spread(Head(64, 128, hidden_dim=64, bottleneck_dim=32))
    with_bn = spread(Head(64, 128, hidden_dim=64, bottleneck_dim=32, use_bn=True))
    assert with_bn > 20 * plain
