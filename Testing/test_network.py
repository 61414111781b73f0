"""Network output shapes and configuration round trip."""
import pytest
import torch

from synomaly.method.network import UNet, UNetConfig, count_parameters


@pytest.mark.parametrize("size,channels,mult,attn", [(32, 1, (1, 2), (16,)), (64, 3, (1, 2, 2), (16, 8))])
def test_output_shape_matches_input(size, channels, mult, attn):
    cfg = UNetConfig(in_channels=channels, out_channels=channels, base_channels=8, channel_mult=mult,
                     attention_resolutions=attn, image_size=size)
    net = UNet(cfg)
    x = torch.randn(2, channels, size, size)
    y = net(x, torch.tensor([0, 999]))
    assert y.shape == x.shape


def test_timestep_changes_output_after_training_step():
    net = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), image_size=16))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 1, 16, 16)
    for _ in range(3):  # zero-initialised output layers: the time path gets gradients from the second step
        opt.zero_grad()
        (net(x, torch.tensor([5, 5])) - 1).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        a, b = net(x, torch.tensor([5, 5])), net(x, torch.tensor([900, 900]))
    assert not torch.allclose(a, b)


def test_config_round_trip_and_parameter_count():
    cfg = UNetConfig(base_channels=16, num_res_blocks=2)
    again = UNetConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert count_parameters(UNet(cfg)) == count_parameters(UNet(again)) > 100_000
