"""KIVI on small hand-made tensors: keys per channel in blocks of G tokens, values per token, the
residual window's schedule (keys R at a time, values sliding), the real packed bytes, its errors."""

import pytest
import torch

from kvbench.errors import ConfigError
from kvbench.methods import Compression, build_method
from kvbench.packing import dequantize, quantize
from kvbench.storage import ChannelPackedStore


def kivi_layer(ratio=8, **params):
    return build_method("kivi", params, Compression(ratio=ratio)).make_layer(0)


def step(layer, keys, values, phase):
    out = layer.update(keys, values)
    layer.end_step(phase)
    return out


def test_keys_are_quantised_per_channel_over_a_block_of_tokens():
    # 2 bits, G = 4 tokens. Per channel, each range is 3 steps of the channel's own scale (0..3,
    # 10..13, 0..3, 0..6 in steps of 2), so every value is a code exactly; per token (quant's
    # layout) token 3 spans 0..13 in steps of 13/3 and its 3 becomes 13/3
    x = torch.tensor([[0., 10., 0., 0.], [1., 10., 0., 0.], [2., 10., 0., 6.], [3., 13., 3., 0.]])[None, None]
    store = ChannelPackedStore(bits=2, group=4, channels=4)
    store.append(x)
    assert store.tokens == 4
    assert torch.equal(store.read(), x)
    per_token = dequantize(quantize(x, 2, 4))
    assert per_token[0, 0, 3, 0] == pytest.approx(13 / 3, rel=1e-3)
    # bytes: 4 channels x (4 codes of 2 bits = 1 byte + fp16 scale + fp16 zero)
    assert store.nbytes() == 4 * (1 + 2 + 2)
    # a second block is quantised on its own and read back after the first
    store.append(x + 100)
    assert torch.equal(store.read(), torch.cat([x, x + 100], dim=2))


def test_residual_schedule_as_in_kivis_prefill_and_decoding():
    # G = 4, R = 8: a 13-token prompt -> keys 8 quantised + 5 full, values 5 quantised + 8 full
    layer = kivi_layer(group_size=4, residual_length=8)
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 13, 8, generator=g), torch.randn(1, 2, 13, 8, generator=g)
    k, v = step(layer, keys, values, "prefill")
    assert torch.equal(k, keys) and torch.equal(v, values)  # the prefill itself attends exactly
    counts = {name: store.tokens for name, store in layer.stores.items()}
    assert counts == {"keys": 5, "values": 8, "positions": 13, "packed_keys": 8, "packed_values": 5}
    # decoding: values slide by one each step; keys move 8 at a time once 8 are full precision
    decoded = []
    for i in range(3):
        new_k, new_v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
        decoded.append(new_v)
        k, v = step(layer, new_k, new_v, "decode")
        assert torch.equal(k[:, :, -1:], new_k) and torch.equal(v[:, :, -1:], new_v)  # used exactly
        assert layer.stores["values"].tokens == 8 and layer.stores["packed_values"].tokens == 6 + i
    assert (layer.stores["keys"].tokens, layer.stores["packed_keys"].tokens) == (0, 16)  # 5 + 3 = 8 moved
    # what the next step attends over: everything, quantised part first, in position order
    k, v = layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    assert k.shape[2] == v.shape[2] == 17
    assert torch.equal(layer.positions[0, 0], torch.arange(17))
    # the value window (positions 8..15) is returned exactly; the quantised values are not
    assert torch.equal(v[:, :, 8:16], torch.cat([values[:, :, 8:], *decoded], dim=2))
    assert not torch.equal(v[:, :, :8], values[:, :, :8])


def test_bytes_held_are_the_packed_codes_scales_and_full_residual():
    # fp32 model: 1 batch, 2 heads, d = 8, n = 13, G = 4, R = 8, 2 bits
    layer = kivi_layer(group_size=4, residual_length=8)
    step(layer, torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8), "prefill")
    packed_keys = 2 * 2 * 8 * (1 + 2 + 2)  # 2 heads x 2 blocks x 8 channels x (4 codes + scale + zero)
    packed_values = 2 * 5 * (2 + 2 * (2 + 2))  # 2 heads x 5 tokens x (8 codes = 2 bytes + 2 groups' scale, zero)
    full = 2 * (5 + 8) * 8 * 4  # residual keys and values in float32
    assert layer.bytes_held() == packed_keys + packed_values + full
    assert layer.bytes_full() == 2 * 2 * 13 * 8 * 4


@pytest.mark.parametrize("bits", [2, 4])
def test_attention_sees_quantised_values_within_half_a_step(bits):
    layer = kivi_layer(ratio=16 // bits, group_size=4, residual_length=4)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 1, 12, 8, generator=g), torch.randn(1, 1, 12, 8, generator=g)
    step(layer, keys, values, "prefill")
    k, v = layer.update(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    # keys: 12 quantised (R divides 12); values: 8 quantised + the last 4 exact
    assert torch.equal(v[:, :, 8:12], values[:, :, 8:])
    key_step = keys.unflatten(2, (3, 4)).amax(3) - keys.unflatten(2, (3, 4)).amin(3)  # per block, channel
    key_err = (k[:, :, :12] - keys).abs().unflatten(2, (3, 4)).amax(3)
    assert (key_err <= key_step / (2 ** bits - 1) / 2 * 1.001 + 1e-6).all()
    value_step = values[:, :, :8].unflatten(-1, (2, 4))
    value_step = value_step.amax(-1) - value_step.amin(-1)
    value_err = (v[:, :, :8] - values[:, :, :8]).abs().unflatten(-1, (2, 4)).amax(-1)
    assert (value_err <= value_step / (2 ** bits - 1) / 2 * 1.001 + 1e-6).all()
    assert not torch.equal(k[:, :, :12], keys)


@pytest.mark.parametrize("params, comp, message", [
    ({}, {"budget": 64}, "kivi takes no budget"),
    ({}, {"ratio": 3}, "kivi cannot reach ratio 3"),
    ({"bits": 4}, {"ratio": 8}, "kivi with bits=4 compresses 4x"),
    ({"group_size": 32, "residual_length": 48}, {"ratio": 8}, "residual_length 48 must be a multiple of group_size 32"),
    ({"group_size": 6, "residual_length": 12}, {"ratio": 8}, "group_size 6 must be a multiple of 4"),
])
def test_unreachable_settings_are_refused(params, comp, message):
    with pytest.raises(ConfigError, match=message):
        build_method("kivi", params, Compression(**comp))


def test_ratio_names_the_bit_width():
    assert build_method("kivi", {}, Compression(ratio=8)).bits == 2
    assert build_method("kivi", {}, Compression(ratio=4)).bits == 4
