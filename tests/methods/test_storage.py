"""The stores a layer holds its tokens in: dense and packed, one interface (append, keep, evict_one,
nbytes, read), checked on small hand-made tensors."""

import torch

from kvbench.packing import dequantize, quantize, unpack
from kvbench.storage import DenseStore, PackedStore, read_followed_by


def tokens(*values):
    """(1, 1, n, 2) with token i = [values[i], -values[i]]."""
    t = torch.tensor(values, dtype=torch.float32)
    return torch.stack([t, -t], dim=-1)[None, None]


def first_channel(store):
    return store.read()[0, 0, :, 0].tolist()


def test_dense_append_keep_evict_one_and_bytes():
    store = DenseStore()
    store.append(tokens(1, 2, 3))
    store.append(tokens(4))
    assert store.tokens == 4 and first_channel(store) == [1, 2, 3, 4]
    assert store.nbytes() == 4 * 2 * 4  # 4 tokens x 2 channels x float32, not the buffer's room
    store.keep(torch.tensor([[[3, 0, 2]]]))  # in the order given
    assert first_channel(store) == [4, 1, 3] and store.nbytes() == 3 * 2 * 4
    store.evict_one(torch.tensor([[[0]]]))  # the newest token moves into the freed slot
    assert first_channel(store) == [3, 1]
    store.evict_one(torch.tensor([[[1]]]))  # dropping the newest itself
    assert first_channel(store) == [3] and store.tokens == 1
    store.clear()
    assert store.tokens == 0 and store.nbytes() == 0


def test_dense_store_converts_to_its_dtype_and_reads_into_a_tensor():
    store = DenseStore(torch.float16)
    store.append(tokens(1.0001, 2))
    assert store.tensor.dtype == torch.float16 and store.nbytes() == 2 * 2 * 2
    out = torch.full((1, 1, 3, 2), 9.0)
    store.read(out=out[:, :, :2])
    assert out[0, 0, :, 0].tolist() == [1.0, 2.0, 9.0]  # 1.0001 rounded to fp16
    assert store.read(dtype=torch.float32).dtype == torch.float32


def test_dense_appends_write_into_spare_room_and_clones_are_independent():
    store = DenseStore()
    store.append(tokens(*range(10)))
    store.append(tokens(10))  # moves into a buffer with room
    room = store.tensor.data_ptr()
    copy = store.clone()
    for i in range(11, 40):
        store.append(tokens(i))
        assert store.tensor.data_ptr() == room
    store.evict_one(torch.tensor([[[0]]]))
    assert first_channel(copy) == list(range(11)) and first_channel(store)[:2] == [39, 1]


def test_packed_store_bytes_by_hand():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    store = PackedStore(bits=4, group=8)
    store.append(x)
    # per token and head: 16 codes x 4 bits = 8 bytes + 2 groups x (fp16 scale + fp16 zero) = 16 bytes
    assert store.tokens == 5 and store.nbytes() == 2 * 3 * 5 * 16
    store.keep(torch.tensor([4, 1]).expand(2, 3, 2))
    assert store.nbytes() == 2 * 3 * 2 * 16
    whole = quantize(x, 4, 8)
    assert torch.equal(store.read(), dequantize(whole)[:, :, [4, 1]])
    store.evict_one(torch.zeros(2, 3, 1, dtype=torch.long))  # token 1 (the newest) replaces token 4
    assert store.tokens == 1 and torch.equal(store.read(), dequantize(whole)[:, :, [1]])


def test_packed_store_appends_token_by_token_as_one_quantisation():
    x = torch.randn(1, 2, 20, 8, generator=torch.Generator().manual_seed(0))
    store = PackedStore(bits=2, group=8)
    store.append(x[:, :, :10])
    store.append(x[:, :, 10:11])  # now backed by buffers with room
    storage = [part.tensor.data_ptr() for part in store.parts]
    for i in range(11, 20):
        store.append(x[:, :, i:i + 1])
    assert [part.tensor.data_ptr() for part in store.parts] == storage  # no copy of the held tokens
    whole = quantize(x, 2, 8)
    packed = store.packed()
    assert torch.equal(packed.data, whole.data) and torch.equal(unpack(packed.data, 2), unpack(whole.data, 2))
    assert store.nbytes() == whole.nbytes() == 2 * 20 * (2 + 4)


def test_channel_scale_is_applied_before_quantising_and_undone_in_float32():
    x = torch.tensor([[[[1.0, 100.0], [2.0, 300.0]]]])  # (1, 1, 2, 2)
    scale = torch.tensor([[[4.0, 0.5]]])
    store = PackedStore(bits=8, group=2, channel_scale=scale)
    store.append(x)
    expected = dequantize(quantize(x * scale, 8, 2)) / scale
    assert torch.equal(store.read(), expected)
    half = torch.empty(1, 1, 2, 2, dtype=torch.float16)
    assert torch.equal(store.read(out=half), expected.half())


def test_read_followed_by_puts_each_store_then_the_new_tokens():
    dense, packed = DenseStore(), PackedStore(bits=8, group=2)
    dense.append(tokens(1, 2))
    packed.append(tokens(3))
    new = tokens(4)
    out = read_followed_by([dense, packed, DenseStore()], new)
    assert out[0, 0, :, 0].tolist() == [1, 2, dequantize(packed.packed())[0, 0, 0, 0].item(), 4]
    assert read_followed_by([DenseStore()], new) is new  # nothing held: the new tokens themselves
