"""SigLIP loss: hand-computed values, multi-positive labels from sentence keys, learning, and the ring
exchange across gloo processes matching one process on the concatenated batch (loss and gradients)."""

from __future__ import annotations

import hashlib
import math
import socket

import pytest
import torch
import torch.nn.functional as F

from voxseq.objectives import (
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    SigLipLoss,
    key_tensor,
    sentence_key,
    siglip_labels,
)

SCALE, BIAS = torch.tensor(SIGLIP_INIT_LOGIT_SCALE), torch.tensor(SIGLIP_INIT_LOGIT_BIAS)
LIVER, SPLEEN, KIDNEY = (sentence_key(s) for s in ("The liver is normal.", "The spleen is unremarkable.",
                                                    "No renal stones."))


def test_sentence_key_is_stable_and_normalised():
    from voxseq.sequence import chunks

    assert sentence_key is chunks.sentence_key  # the sampler's keys are the loss's keys
    # pinned to its definition: keys stored in caches and computed on other ranks must never drift
    expected = int.from_bytes(hashlib.blake2b(b"the liver is normal.", digest_size=8).digest(), "big") >> 1
    assert sentence_key("The liver is normal.") == expected
    assert sentence_key("  the LIVER  is\nnormal. ") == expected
    assert 0 <= expected < 2**63 and LIVER != SPLEEN != KIDNEY


def test_key_tensor_pads_with_minus_one():
    t = key_tensor([[5, 7], [], [9]])
    assert t.dtype == torch.long and t.tolist() == [[5, 7], [-1, -1], [9, -1]]
    assert key_tensor([[5]], width=3).tolist() == [[5, -1, -1]]
    assert key_tensor([]).shape == (0, 0)
    with pytest.raises(ValueError, match="more than width"):
        key_tensor([[1, 2, 3]], width=2)


def test_multi_positive_labels():
    chunks = key_tensor([[LIVER, SPLEEN], [LIVER], [KIDNEY]])
    texts = key_tensor([[LIVER, SPLEEN], [LIVER], [KIDNEY, SPLEEN], [], [SPLEEN]])
    assert siglip_labels(chunks, texts).tolist() == [
        [1, 1, 0, 0, 1],  # shows liver and spleen: its own text, the liver-only and the spleen-only texts
        [0, 1, 0, 0, 0],  # liver only: the two-sentence text needs the spleen too
        [0, 0, 0, 0, 0],  # kidney only: the kidney+spleen text is not all shown; the empty text matches nothing
    ]


def test_known_values_2x2():
    e = torch.eye(2)  # logits = 10 * e @ t.T - 10
    same = SigLipLoss()(e, e, SCALE, BIAS)  # diagonal logits 0 (positives), off-diagonal -10 (negatives)
    assert same.item() == pytest.approx((2 * math.log(2) + 2 * math.log1p(math.exp(-10))) / 2, rel=1e-6)
    swapped = SigLipLoss()(e, e.flip(0), SCALE, BIAS)  # positives at -10, negatives at 0
    assert swapped.item() == pytest.approx((2 * math.log1p(math.exp(10)) + 2 * math.log(2)) / 2, rel=1e-6)
    # keys making text 1 a second positive of image 0: the pair (0, 1) at logit -10 now costs log(1 + e^10)
    keys = SigLipLoss()(e, e, SCALE, BIAS, key_tensor([[LIVER, SPLEEN], [SPLEEN]]), key_tensor([[LIVER], [SPLEEN]]))
    expected = (2 * math.log(2) + math.log1p(math.exp(10)) + math.log1p(math.exp(-10))) / 2
    assert keys.item() == pytest.approx(expected, rel=1e-6)


def test_identity_labels_without_keys():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    eye_keys = key_tensor([[k] for k in range(4)])  # one distinct sentence per pair: the identity again
    assert torch.equal(siglip_labels(eye_keys, eye_keys), torch.eye(4))
    assert torch.allclose(SigLipLoss()(img, txt, SCALE, BIAS), SigLipLoss()(img, txt, SCALE, BIAS, eye_keys, eye_keys))
    with pytest.raises(ValueError, match="one-to-one"):
        SigLipLoss()(img, txt[:3], SCALE, BIAS)
    with pytest.raises(ValueError, match="together"):
        SigLipLoss()(img, txt, SCALE, BIAS, image_keys=eye_keys)


def test_loss_goes_down_when_optimising_embeddings():
    torch.manual_seed(0)
    img, txt = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    scale, bias = torch.tensor(SIGLIP_INIT_LOGIT_SCALE, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    keys = key_tensor([[0, 1], [1], [2], [3], [4], [5], [6], [7]])  # text 1 is a second positive of image 0
    opt = torch.optim.Adam([img, txt, scale, bias], lr=0.05)
    losses = []
    for _ in range(60):
        loss = SigLipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, bias, keys, keys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    assert (sim.diagonal() > 0.5).all() and sim[0, 1] > 0.5  # both positives of image 0 pulled close


# --- distributed: the ring exchange against one process on the concatenated batch ------------------

N_PER_RANK, TEXTS_PER_RANK, DIM = 3, (4, 2, 3), 8  # texts per rank differ: ranks may hold uneven text blocks


def global_batch(world: int) -> dict[str, torch.Tensor]:
    """Chunks of a few volumes, each paired with the sentences of its organs; sentences repeat across ranks."""
    g = torch.Generator().manual_seed(1)
    m = sum(TEXTS_PER_RANK[:world])
    organ_keys = [[k] for k in torch.randint(0, 4, (world * N_PER_RANK,), generator=g).tolist()]
    text_keys = [[k, (k + 1) % 4] for k in torch.randint(0, 4, (m,), generator=g).tolist()]
    text_keys[-1] = []  # an empty text: a negative for every chunk
    image_keys = [k + [(k[0] + 1) % 4] for k in organ_keys]  # each chunk shows two organs
    return {"img": F.normalize(torch.randn(world * N_PER_RANK, DIM, generator=g), dim=-1),
            "txt": F.normalize(torch.randn(m, DIM, generator=g), dim=-1),
            "img_pair": F.normalize(torch.randn(world * N_PER_RANK, DIM, generator=g), dim=-1),
            "txt_pair": F.normalize(torch.randn(world * N_PER_RANK, DIM, generator=g), dim=-1),
            "image_keys": key_tensor(image_keys), "text_keys": key_tensor(text_keys)}


def loss_and_grads(img, txt, image_keys=None, text_keys=None, **ring) -> dict[str, torch.Tensor]:
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale, bias = torch.tensor(1.2, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    loss = SigLipLoss(**ring)(img, txt, scale, bias, image_keys, text_keys)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad, "bias": bias.grad}


def ring_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = global_batch(world)
    i = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    t0 = sum(TEXTS_PER_RANK[:rank])
    t = slice(t0, t0 + TEXTS_PER_RANK[rank])
    # text keys of this rank only, padded to its own width: the ring must carry blocks of any shape
    text_keys = key_tensor([[k for k in row.tolist() if k != -1] for row in b["text_keys"][t]])
    keyed = loss_and_grads(b["img"][i], b["txt"][t], b["image_keys"][i], text_keys)  # world from dist
    paired = loss_and_grads(b["img_pair"][i], b["txt_pair"][i], world_size=world, rank=rank)
    torch.save({"keyed": keyed, "paired": paired}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_ring_exchange_matches_single_process(tmp_path, world):
    """Per-rank losses averaged == the single-process loss on the concatenated batch.

    Gradients: each rank's gradient w.r.t. its own image and text embeddings (texts receive, through the
    exchange's backward, the gradients of every rank's loss) is the gradient of the SUM of the per-rank
    losses, i.e. world x the gradient of the single-process loss; divided by world (what DDP's gradient
    averaging does) it equals the single-process gradient's slice. Logit scale/bias gradients: their
    mean over ranks equals the single-process gradient.
    """
    import torch.multiprocessing as mp

    mp.spawn(ring_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    b = global_batch(world)
    single = {"keyed": loss_and_grads(b["img"], b["txt"], b["image_keys"], b["text_keys"]),
              "paired": loss_and_grads(b["img_pair"], b["txt_pair"])}
    assert single["keyed"]["loss"] != single["paired"]["loss"]
    for case, ref in single.items():
        per_rank = [r[case] for r in ranks]
        assert torch.allclose(torch.stack([r["loss"] for r in per_rank]).mean(), ref["loss"], atol=1e-5), case
        for name in ("scale", "bias"):
            assert torch.allclose(torch.stack([r[name] for r in per_rank]).mean(), ref[name], atol=1e-5), (case, name)
        texts = TEXTS_PER_RANK[:world] if case == "keyed" else (N_PER_RANK,) * world
        for name, sizes in (("img", (N_PER_RANK,) * world), ("txt", texts)):
            for r, ref_slice in enumerate(ref[name].split(list(sizes))):
                assert torch.allclose(per_rank[r][name] / world, ref_slice, atol=1e-5), (case, name, r)
