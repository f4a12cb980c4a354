"""Alignment losses against fp64 hand implementations; lambda schedule; the teacher cache on a real backbone."""

import math

import pytest
import torch

from dsxfer.method import alignment as align
from dsxfer.config import load_config
from dsxfer.errors import ConfigError
from dsxfer.method.model import TransferModel
from tiny import tiny_backbone


# ------------------------------------------------------------------ hand implementations (fp64, loops)


def _pool(h, m):
    return sum(h[i] for i in range(len(m)) if m[i]) / sum(m)


def _cos(a, b):
    return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))


def _softmax(xs):
    mx = max(xs)
    e = [math.exp(x - mx) for x in xs]
    return [v / sum(e) for v in e]


def _rows(hidden, mask, level):
    """(row vector, pair index) per student row: one pooled row per pair, or every real token."""
    out = []
    for n in range(hidden.shape[0]):
        m = mask[n].tolist()
        if level == "pooled":
            out.append((_pool(hidden[n], m), n))
        else:
            out.extend((hidden[n, i], n) for i in range(len(m)) if m[i])
    return out


def hand_loss(hidden, mask, teacher, loss, level, tau):
    rows = _rows(hidden, mask, level)
    N = teacher.shape[0]
    values = []
    for s, n in rows:
        if loss == "cosine":
            values.append(1 - _cos(s, teacher[n]))
        elif loss == "mse":
            values.append(sum(float(x) ** 2 for x in (s - teacher[n])) / len(s))
        elif loss == "infonce":
            logits = [_cos(s, teacher[m]) / tau for m in range(N)]
            values.append(-math.log(_softmax(logits)[n]))
        elif loss == "kl":
            q = _softmax([_cos(s, teacher[m]) / tau for m in range(N)])
            p = _softmax([_cos(teacher[n], teacher[m]) / tau for m in range(N)])
            values.append(sum(p[m] * (math.log(p[m]) - math.log(q[m])) for m in range(N)))
    return sum(values) / len(values)


@pytest.mark.parametrize("level", ["pooled", "token"])
@pytest.mark.parametrize("loss", ["cosine", "mse", "infonce", "kl"])
def test_losses_and_gradients_match_hand_implementation(loss, level):
    g = torch.Generator().manual_seed(3)
    N, T, H = 5, 7, 6
    hidden = torch.randn(N, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    teacher = torch.randn(N, H, generator=g, dtype=torch.float64)
    tau = 0.3
    ours = align.alignment_loss(hidden, mask, teacher, loss=loss, level=level, temperature=tau)
    expected = hand_loss(hidden.detach(), mask, teacher, loss, level, tau)
    assert ours.dtype == torch.float64
    assert abs(float(ours.detach()) - expected) < 1e-10
    ours.backward()
    # gradient: central differences of the hand implementation on a few coordinates, padding included
    eps = 1e-6
    for (n, t, h) in [(0, 0, 0), (1, 3, 2), (1, 5, 1), (3, 1, 5), (4, 6, 3)]:
        plus, minus = hidden.detach().clone(), hidden.detach().clone()
        plus[n, t, h] += eps
        minus[n, t, h] -= eps
        numeric = (hand_loss(plus, mask, teacher, loss, level, tau) - hand_loss(minus, mask, teacher, loss, level, tau)) / (2 * eps)
        assert abs(float(hidden.grad[n, t, h]) - numeric) < 1e-6, (n, t, h)
    assert float(hidden.grad[1, 5].abs().sum()) == 0.0  # padded positions get no gradient


def test_unknown_loss_name_is_a_config_error():
    with pytest.raises(ConfigError, match="alignment.loss='l1' is invalid: unknown loss, expected one of cosine, mse, infonce, kl"):
        align.alignment_loss(torch.zeros(1, 2, 3), torch.ones(1, 2), torch.zeros(1, 3), loss="l1")


def test_weight_schedule_warmup_and_decay():
    w = lambda step, **kw: align.alignment_weight(step, weight=2.0, **kw)
    assert [w(s, warmup_steps=4) for s in (0, 1, 2, 4, 50)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert [w(s, warmup_steps=2, decay="linear", total_steps=10) for s in (2, 6, 10)] == [2.0, 1.0, 0.0]
    assert w(6, warmup_steps=2, decay="cosine", total_steps=10) == pytest.approx(1.0)
    assert w(4, warmup_steps=2, decay="cosine", total_steps=10) == pytest.approx(1.0 + math.cos(math.pi / 4))


# ------------------------------------------------------------------------- teacher cache on a real model


def align_batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for b in range(3):
        src = torch.randint(5, 120, (4, 8), generator=g)
        tgt = torch.randint(5, 120, (4, 6), generator=g)
        src_mask, tgt_mask = torch.ones_like(src), torch.ones_like(tgt)
        src_mask[0, 5:] = 0
        tgt_mask[2, 3:] = 0
        out.append({"align_src_input_ids": src, "align_src_attention_mask": src_mask, "align_tgt_input_ids": tgt,
                    "align_tgt_attention_mask": tgt_mask, "align_pair_ids": torch.arange(4) + 4 * b})
    return out


def config(tmp_path, *overrides):
    return load_config(None, ["model.max_length=64", "model.doc_stride=16", "prompts.length=2", "injection.length=2",
                              f"train.output_dir={tmp_path}", "alignment.layers=[-1, 1]", *overrides])


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_teacher_cache_avoids_teacher_forwards_after_first_epoch(tmp_path):
    model = TransferModel(tiny_backbone(), config(tmp_path))
    calls = count_forwards(model.backbone)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_epoch = []
    for epoch in range(3):
        start = len(calls)
        for b in align_batches():
            optimizer.zero_grad()
            out = model(b)
            out["loss"].backward()
            optimizer.step()
            assert out["align_loss"] > 0
        per_epoch.append(len(calls) - start)
    assert per_epoch == [6, 3, 3]  # epoch 1: teacher + student per batch; later: student only
    assert model.teacher_cache.teacher_forwards == 12 and len(model.teacher_cache) == 12

    # the cached vectors are the unprompted backbone's masked mean of the chosen layers on the source side
    plain = tiny_backbone().eval()
    b = align_batches()[1]
    with torch.no_grad():
        states = plain(input_ids=b["align_src_input_ids"], attention_mask=b["align_src_attention_mask"],
                       output_hidden_states=True).hidden_states
    cached = model.teacher_cache.get(b["align_pair_ids"].tolist(), "cpu")
    for j, layer in enumerate([-1, 1]):
        for n in range(4):
            m = b["align_src_attention_mask"][n].bool()
            torch.testing.assert_close(cached[n, j], states[layer][n][m].mean(0), atol=1e-5, rtol=1e-5)


def test_disk_teacher_cache_is_reused_by_a_later_run(tmp_path):
    first = TransferModel(tiny_backbone(), config(tmp_path, "alignment.teacher_cache=disk"))
    for b in align_batches():
        first(b)
    first.teacher_cache.flush()
    assert first.teacher_cache.path.is_file()
    second = TransferModel(tiny_backbone(), config(tmp_path, "alignment.teacher_cache=disk"))
    calls = count_forwards(second.backbone)
    for b in align_batches():
        second(b)
    assert len(calls) == 3 and second.teacher_cache.teacher_forwards == 0
    other_layers = TransferModel(tiny_backbone(), config(tmp_path, "alignment.teacher_cache=disk", "alignment.layers=[-1]"))
    assert len(other_layers.teacher_cache) == 0  # a different layer choice never reads the wrong vectors


def test_alignment_layer_that_does_not_exist_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"alignment.layers=\[7\] is invalid: layer 7 does not exist"):
        TransferModel(tiny_backbone(), config(tmp_path, "alignment.layers=[7]"))
