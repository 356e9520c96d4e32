"""Packed rows attending within each segment only: equal to the block-diagonal masked path."""

from __future__ import annotations

import torch

from voxseq.models.vit3d import ViT3D, segment_plan, vit_config
from voxseq.models.vit3d import packed_attention_mask
from voxseq.sequence.chunks import collate_packed


def _items(lengths, dim=8 ** 3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randn(n, dim, generator=g), "pos": torch.randint(0, 9, (n, 3), generator=g).float()}
            for n in lengths]


def test_plan_covers_every_real_token_once():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 2, -1]])
    plan = segment_plan(seg)
    taken = torch.cat([idx[valid] for idx, valid in plan.buckets])
    assert sorted(taken.tolist()) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert [int(v.sum()) for _, v in plan.buckets] == [5, 3, 2]  # 3 < 0.75 x 5: each length its own bucket
    assert [int(v.sum()) for _, v in segment_plan(seg, bucket_ratio=0.5).buckets] == [8, 2]  # 5 and 3 together


def test_segment_ids_repeated_across_rows_stay_apart():
    seg = torch.tensor([[0, 0, 1], [0, 0, 1]])
    assert sum(int(v.sum(1).numel()) for _, v in segment_plan(seg).buckets) == 4  # four segments, not two


def test_segment_path_equals_masked_path_forward_and_backward():
    torch.manual_seed(0)
    model = ViT3D(vit_config("tiny", patch_size=8, pos_embed="rope3d", depth=2)).double()
    b = collate_packed(_items([37, 120, 64, 9, 200, 150, 33]), max_tokens=256)
    tokens, pos, seg = b["tokens"].double(), b["pos"].double(), b["segment"]
    assert (seg < 0).any()  # padding present: its tokens must match too
    ref_in = tokens.clone().requires_grad_(True)
    new_in = tokens.clone().requires_grad_(True)
    ref = model.forward_tokens(ref_in, pos, mask=packed_attention_mask(seg))
    ref.pow(2).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    new = model.forward_tokens(new_in, pos, segment=seg)
    new.pow(2).sum().backward()
    torch.testing.assert_close(new, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new_in.grad, ref_in.grad, rtol=1e-8, atol=1e-8)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-7, atol=1e-8)


def test_segment_path_in_float32_is_within_tolerance():
    torch.manual_seed(1)
    model = ViT3D(vit_config("tiny", patch_size=8, pos_embed="rope3d", depth=2))
    b = collate_packed(_items([300, 250, 40, 500, 12], seed=3), max_tokens=1024)
    with torch.no_grad():
        ref = model.forward_tokens(b["tokens"], b["pos"], mask=packed_attention_mask(b["segment"]))
        new = model.forward_tokens(b["tokens"], b["pos"], segment=b["segment"])
    torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-4)
