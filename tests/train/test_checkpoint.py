"""Checkpoints: round trip, atomic completeness, corruption, untrusted pickles, key reports."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from voxseq import VoxseqError
from voxseq.train.checkpoint import (
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
)
from voxseq.train.optim import build_optimizer, param_groups


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def step(model, opt):
    loss = model(torch.ones(3, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_resumes_exactly(tmp_path):
    a = tiny()
    opt = build_optimizer(param_groups(a, 0.01), 1e-2)
    step(a, opt)
    save_checkpoint(tmp_path, 1, a, training_state={"optimizer": opt.state_dict(), "rng": get_rng_state()},
                    meta={"config": {"x": 1}})
    step(a, opt)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1 and ck.meta["config"] == {"x": 1}
    b = tiny()
    rep = load_state_dict_checked(b, ck.state_dict, strict=True)
    assert len(rep.loaded) == 6 and not rep.missing
    opt_b = build_optimizer(param_groups(b, 0.01), 1e-2)
    st = ck.training_state()
    opt_b.load_state_dict(st["optimizer"])
    set_rng_state(st["rng"])
    step(b, opt_b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_rng_state_round_trip():
    s = get_rng_state()
    x = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    set_rng_state(s)
    y = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(x[0], y[0]) and x[1:] == y[1:]


def test_incomplete_and_corrupt_checkpoints(tmp_path):
    m = tiny()
    save_checkpoint(tmp_path, 1, m)
    save_checkpoint(tmp_path, 2, m)
    (tmp_path / "checkpoints" / "model_00000002.json").unlink()  # crashed before the metadata was written
    assert latest_checkpoint(tmp_path).name == "model_00000001.json"
    save_checkpoint(tmp_path, 3, m)
    w = tmp_path / "checkpoints" / "model_00000003.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert latest_checkpoint(tmp_path).name == "model_00000001.json"
    with pytest.raises(VoxseqError, match="model_00000003.safetensors: checksum mismatch"):
        load_checkpoint(tmp_path / "checkpoints" / "model_00000003.json")


def test_keep_last(tmp_path):
    m = tiny()
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, m, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.json")) == ["model_00000004.json", "model_00000005.json"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    m = tiny()
    save_checkpoint(tmp_path, 1, m, training_state={"ok": torch.ones(1)})
    evil = tmp_path / "checkpoints" / "optim_00000001.pt"
    with open(evil, "wb") as f:
        pickle.dump({"optimizer": Evil()}, f)
    ck = load_checkpoint(tmp_path, verify=False)
    with pytest.raises(VoxseqError, match="refused to load training state"):
        ck.training_state()


def test_load_report_names_what_does_not_fit():
    src = {"module.0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8), "2.weight": torch.zeros(3, 8),
           "extra.weight": torch.zeros(1)}
    rep = load_state_dict_checked(tiny(), src)
    assert "0.weight" in rep.loaded and "0.bias" in rep.loaded
    assert rep.unexpected == ["extra.weight"]
    assert rep.mismatched == [("2.weight", (3, 8), (2, 8))]
    assert "1.weight" in rep.missing and "2.weight" not in rep.missing
    assert "shape mismatch 2.weight" in rep.summary()
    with pytest.raises(VoxseqError, match="does not fit"):
        load_state_dict_checked(tiny(), src, strict=True)
    rep = load_state_dict_checked(tiny(), {"encoder.0.weight": torch.ones(8, 4)}, prefix_map={"encoder.": ""})
    assert rep.loaded == ["0.weight"]
