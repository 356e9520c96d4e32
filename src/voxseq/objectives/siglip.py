"""SigLIP pairwise sigmoid loss for chunk-text pretraining, with multi-positive labels and ring-exchanged
negatives across ranks (Zhai et al. 2023; the SigVLP pairing of 3D chunks with organ-wise sentences).

A chunk of a volume is paired with the sentences of the organs it shows. Sentences are identified by a
stable key, so a chunk is also a positive for every other text in the batch that is made only of
sentences it shows (two chunks of one volume showing the liver, a normal-spleen sentence shared by
patients): treating those as negatives would push apart pairs that truly match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# the sampler keys sentences when it pairs chunks with text; one definition, re-exported for loss users
from voxseq.sequence.chunks import sentence_key

# The SigLIP paper's init of the temperature and bias the model owns (SigVLP takes them from the task):
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # t' = log 10 ...
SIGLIP_INIT_LOGIT_BIAS = -10.0  # ... and a bias that starts every pair near "negative", as most pairs are

PAD_KEY = -1  # sentence keys are 63-bit, hence >= 0: -1 is free for padding


def key_tensor(keys: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """(N, K) int64 tensor of per-item key lists, right-padded with -1 to ``width`` (default: longest list)."""
    width = max((len(k) for k in keys), default=0) if width is None else width
    out = torch.full((len(keys), width), PAD_KEY, dtype=torch.long)
    for i, row in enumerate(keys):
        if len(row) > width:
            raise ValueError(f"item {i} has {len(row)} keys, more than width={width}")
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def siglip_labels(chunk_keys: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """(N, M) float {0, 1}: chunk i and text j match when every sentence of text j is one chunk i shows.

    A text without any key matches no chunk (it could otherwise be a positive for everything).
    """
    valid = text_keys != PAD_KEY  # (M, K')
    shown = (chunk_keys[:, None, :, None] == text_keys[None, :, None, :]).any(dim=2)  # (N, M, K')
    covered = (shown | ~valid[None]).all(dim=-1)  # (N, M)
    return (covered & valid.any(dim=-1)[None]).float()


def identity_labels(n: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """The classic one-positive-per-row labels: item i matches text i."""
    if n != m:
        raise ValueError(f"without keys the pairing is one-to-one, but got {n} images and {m} texts")
    return torch.eye(n, device=device)


def siglip_pair_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-sum(log sigmoid(z * logits)) over all (image, text) pairs, z = +1 for matches and -1 otherwise.

    Summed in float32 even under bf16 autocast: a sum over N x M pairs in bf16 loses the small terms.
    """
    logits = logit_scale.exp() * (image_emb @ text_emb.T).float() + logit_bias  # (N, M)
    z = 2 * labels.to(logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum()


def _exchange(send: torch.Tensor, to_rank: int, from_rank: int, recv_shape: Sequence[int]) -> torch.Tensor:
    """Send ``send`` to ``to_rank`` while receiving a tensor of ``recv_shape`` from ``from_rank``."""
    recv = torch.empty(tuple(recv_shape), dtype=send.dtype, device=send.device)
    # empty blocks (a rank without texts, texts without keys) are skipped on both ends: both know the shape
    ops = [dist.P2POp(dist.isend, send.contiguous(), to_rank)] if send.numel() else []
    ops += [dist.P2POp(dist.irecv, recv, from_rank)] if recv.numel() else []
    for req in dist.batch_isend_irecv(ops) if ops else []:
        req.wait()
    return recv


class _RingExchange(torch.autograd.Function):
    """Pass a block one step along the ring; the gradient goes back one step the other way."""

    @staticmethod
    def forward(ctx, send, to_rank, from_rank, recv_shape):
        ctx.to_rank, ctx.from_rank, ctx.send_shape = to_rank, from_rank, send.shape
        return _exchange(send, to_rank, from_rank, recv_shape)

    @staticmethod
    def backward(ctx, grad):
        # the block we received came from ``from_rank``: its gradient belongs there; ours comes from ``to_rank``
        return _exchange(grad, ctx.from_rank, ctx.to_rank, ctx.send_shape), None, None, None


def _block_shapes(emb: torch.Tensor, keys: torch.Tensor | None, world: int) -> list[tuple[int, int]]:
    """(texts, key width) of every rank's block, so that ranks may hold batches of different sizes."""
    mine = torch.tensor([emb.shape[0], -1 if keys is None else keys.shape[1]], device=emb.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [tuple(int(v) for v in s) for s in every]


class SigLipLoss(nn.Module):
    """SigLIP loss of local images against every text of the global batch.

    Texts (and their keys) travel around the ring of ranks one block at a time, so no rank ever holds
    the whole global text batch and memory stays that of two blocks. The loss is normalised by the
    local image count: with equal batches on every rank the mean of the per-rank losses equals the
    loss of one process on the concatenated batch (and DDP's gradient averaging matches its gradient).
    """

    def __init__(self, world_size: int | None = None, rank: int | None = None):
        super().__init__()
        self.world_size, self.rank = world_size, rank

    def _ring(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.world_size, self.rank or 0
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, image_keys: torch.Tensor | None = None,
                text_keys: torch.Tensor | None = None) -> torch.Tensor:
        """image_emb (N, D), text_emb (M, D), both L2-normalised; keys (N, K) / (M, K') or both None."""
        if (image_keys is None) != (text_keys is None):
            raise ValueError("pass image_keys and text_keys together (or neither for one-to-one pairs)")
        world, rank = self._ring()
        n = image_emb.shape[0]
        labels = self._labels(image_emb, text_emb, image_keys, text_keys, own_block=True)
        loss = siglip_pair_loss(image_emb, text_emb, logit_scale, logit_bias, labels)
        if world > 1:
            loss = loss + self._remote_blocks_loss(image_emb, text_emb, logit_scale, logit_bias,
                                                   image_keys, text_keys, world, rank)
        return loss / n

    def _labels(self, image_emb, text_emb, image_keys, text_keys, own_block: bool) -> torch.Tensor:
        if image_keys is not None:
            return siglip_labels(image_keys, text_keys)
        if own_block:
            return identity_labels(image_emb.shape[0], text_emb.shape[0], image_emb.device)
        return torch.zeros(image_emb.shape[0], text_emb.shape[0], device=image_emb.device)  # another rank's pairs

    def _remote_blocks_loss(self, image_emb, text_emb, logit_scale, logit_bias, image_keys, text_keys,
                            world: int, rank: int) -> torch.Tensor:
        """world - 1 ring steps: at step s this rank holds the texts of rank (rank - s) mod world."""
        shapes = _block_shapes(text_emb, text_keys, world)
        to_rank, from_rank = (rank + 1) % world, (rank - 1) % world
        block, keys, total = text_emb, text_keys, 0.0
        for step in range(1, world):
            n_texts, width = shapes[(rank - step) % world]
            block = _RingExchange.apply(block, to_rank, from_rank, (n_texts, text_emb.shape[1]))
            if keys is not None:
                keys = _exchange(keys, to_rank, from_rank, (n_texts, width))
            labels = self._labels(image_emb, block, image_keys, keys, own_block=False)
            total = total + siglip_pair_loss(image_emb, block, logit_scale, logit_bias, labels)
        return total
