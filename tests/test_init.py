"""Layout-independent initialization: any region of a parameter, initialized alone, holds the
bits of the same region of the whole parameter, within one generated block of memory."""
import pytest
import torch

from loom.metrics.memory import LiveTensorBytes
from loom.models.init import BLOCK_ELEMENTS, InitSpec, fill_region, rows_per_block
from loom.models.transformer import ModelConfig, build_model

SPEC = InitSpec("trunc_normal", 0.02)


def whole(shape, name="w", spec=SPEC, seed=0):
    out = torch.empty(shape)
    fill_region(out, name, shape, (0,) * len(shape), spec, seed)
    return out


@pytest.mark.parametrize("shape, region", [
    ((3000, 1024), ((0, 3000), (0, 1024))),        # whole, three blocks
    ((3000, 1024), ((1000, 2100), (0, 1024))),     # an FSDP shard across a block boundary
    ((3000, 1024), ((1500, 1501), (512, 1024))),   # one row of a column-parallel slice
    ((3000, 1024), ((0, 3000), (256, 512))),       # a row-parallel slice (columns)
    ((5000,), ((4000, 5000),)),                   # a vector
])
def test_any_region_equals_the_same_region_of_the_whole(shape, region):
    full = whole(shape)
    offset = tuple(a for a, _ in region)
    part = torch.empty(tuple(b - a for a, b in region))
    fill_region(part, "w", shape, offset, SPEC, 0)
    assert torch.equal(part, full[tuple(slice(a, b) for a, b in region)])


def test_values_depend_on_seed_and_name_only():
    torch.manual_seed(123)  # the global generator plays no part
    a = whole((64, 32))
    torch.set_num_threads(1)
    b = whole((64, 32))
    torch.set_num_threads(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, whole((64, 32), seed=1))
    assert not torch.equal(a, whole((64, 32), name="v"))
    n = whole((200_000,), spec=InitSpec("normal", 1.0))
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    t = whole((200_000,), spec=InitSpec("trunc_normal", 1.0))
    assert t.abs().max() <= 3.0 and abs(t.std() - 0.986) < 0.01  # truncation at 3 std


def test_filling_a_shard_holds_at_most_one_block_besides_it():
    shape = (8 * rows_per_block((1, 1024)), 1024)  # 8 blocks, 32 MiB whole
    shard = torch.empty(shape[0] // 2, 1024)  # 16 MiB, from the middle of block 2 to that of block 6
    with LiveTensorBytes() as mem:
        fill_region(shard, "w", shape, (shape[0] // 4 + 100, 0), SPEC, 0)
    assert 0 < mem.peak <= 4 * BLOCK_ELEMENTS + 4096
    assert mem.peak < shard.numel() * 4  # a block, not a copy of the shard or the whole


def test_model_init_is_the_union_of_its_regions(micro_cfg):
    """init_weights of a whole model equals filling each parameter row by row."""
    model = build_model(micro_cfg, "cpu")
    model.init_weights(seed=7)
    for name, p in model.named_parameters():
        rows = [torch.empty(1, *p.shape[1:]) for _ in range(p.shape[0])]
        for i, r in enumerate(rows):
            fill_region(r, name, tuple(p.shape), (i,) + (0,) * (p.ndim - 1), model.init_spec(name), 7)
        assert torch.equal(torch.cat(rows), p.detach()), name


def test_init_specs_follow_the_published_recipe():
    cfg = ModelConfig(dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97)
    model = build_model(cfg)
    assert model.init_spec("layers.3.ffn_norm.weight").kind == "ones"
    assert model.init_spec("tok_embeddings.weight") == InitSpec("normal", 0.02)
    assert model.init_spec("layers.0.attention.wq.weight") == InitSpec("trunc_normal", 0.02)
    assert model.init_spec("layers.0.attention.wo.weight").std == pytest.approx(0.02 / 4)  # 1/sqrt(2 x 8)
    assert model.init_spec("output.weight").std == pytest.approx(64 ** -0.5)
