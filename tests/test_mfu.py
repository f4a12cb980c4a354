"""The MFU estimate counts what a step computes (dsxfer.training.mfu)."""

from dsxfer.training.mfu import flops_per_token, model_flops_per_token
from tiny import build, method_cfg


def test_flops_per_token_by_hand():
    # 4 layers of 10 parameters, a head of 2; the cache starts at layer 2, backward stops at layer 3,
    # 5 trainable per-token parameters:
    #   forward 2 x (10 + 10 + 2) = 44, input gradients 2 x (10 + 2) = 24, weight gradients 2 x 5 = 10
    assert flops_per_token([10, 10, 10, 10], 2, first_run=2, first_backward=3, trainable_params=5) == 78
    # full fine-tuning of everything: the familiar 6 x parameters
    assert flops_per_token([10, 10, 10, 10], 2, first_run=0, first_backward=0, trainable_params=42) == 6 * 42


def test_model_count_follows_the_cache_and_the_lowest_open_layer(tmp_path):
    cached = build(method_cfg(tmp_path, "auto"))   # prefixes in layers 2-3, layer 3 trainable, cache from layer 2
    plain = build(method_cfg(tmp_path, "disabled"))
    layer = sum(p.numel() for p in cached.backbone.encoder.layer[0].parameters())
    head = sum(p.numel() for p in cached.head.parameters())
    with_cache, how = model_flops_per_token(cached)
    without, _ = model_flops_per_token(plain)
    trainable = layer + head  # layer 3 and the head (prefixes are not per-token matrices)
    assert without == 2 * (4 * layer + head) + 2 * (2 * layer + head) + 2 * trainable
    assert without - with_cache == 2 * 2 * layer  # layers 0-1 no longer run forward
    assert "forward through layers 2..3" in how and "input gradients through layers 2..3" in how
