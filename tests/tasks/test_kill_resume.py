"""Training under kills: `voxseq pretrain ar|vlp` SIGKILLed at random moments and resumed with `--resume`
logs exactly the losses of an uninterrupted run; torchrun `--max-restarts` brings a 2-process run back
after one of its workers is killed, again with the uninterrupted run's losses.

The quick variants (default suite) kill each command twice; the slow ones (``-m slow``) six times over a
longer run. Kills hit the process group (the command and anything it started), as an OOM killer or a
lost node would, at a random moment 1-3 logged steps past the previous attempt's furthest step plus a
random part of a step, so they land in forward/backward passes, checkpoint writes and metric writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tasks.test_pretrain_ar import CONFIG as AR_CONFIG
from tests.tasks.test_pretrain_ar import TINY as AR_TINY
from tests.tasks.test_pretrain_vlp import CONFIG as VLP_CONFIG
from tests.tasks.test_pretrain_vlp import text_model, tiny  # noqa: F401 - text_model is a fixture
from voxseq.cli import main
from voxseq.train.checkpoint import latest_checkpoint, load_checkpoint
from voxseq.train.metrics import read_metrics

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count in every process: the same floating point sums
TIMEOUT_S = 300


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def _max_logged(run: Path) -> int:
    return max((r["step"] for r in read_metrics(run)), default=-1)


def _checkpoint_step(run: Path) -> int:
    path = latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    return int(path.stem.split("_")[-1]) if path is not None else 0


def _finish(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr[-3000:]


def kill_and_resume(cmd: list[str], run: Path, kills: int, seed: int) -> list[tuple[int, int]]:
    """Run ``cmd --resume`` and SIGKILL it ``kills`` times, then let it finish. Each attempt is killed once it
    has logged 1-3 steps beyond the furthest step any earlier attempt logged (so every attempt makes progress),
    plus a random 0-0.3 s. Returns (furthest logged step, latest complete checkpoint) at each kill."""
    rng = np.random.default_rng(seed)
    at_kill: list[tuple[int, int]] = []
    while len(at_kill) < kills:
        target = _max_logged(run) + int(rng.integers(1, 4))
        proc = subprocess.Popen([*cmd, "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                                start_new_session=True)
        t0 = time.monotonic()
        while proc.poll() is None and _max_logged(run) < target and time.monotonic() - t0 < TIMEOUT_S:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # it finished first: nothing left to kill
            err = proc.stderr.read().decode(errors="replace")
            assert proc.returncode == 0, err[-3000:]
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        at_kill.append((_max_logged(run), _checkpoint_step(run)))
    _finish([*cmd, "--resume"])
    return at_kill


def _assert_same_run(run: Path, reference: Path, max_steps: int) -> None:
    assert sorted(_losses(run)) == list(range(max_steps))  # each step logged once
    assert _losses(run) == _losses(reference)  # bit for bit
    assert load_checkpoint(run).step == max_steps


@pytest.fixture(scope="module")
def ar_cache(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ar_prep")
    assert main(["pretrain", "ar", "--config", str(AR_CONFIG), "--out", str(run / "r"), *AR_TINY, "max_steps=1",
                 f"data.cache={run / 'cache'}"]) == 0
    return run / "cache"


@pytest.fixture(scope="module")
def vlp_cache(tmp_path_factory, text_model) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("vlp_prep")
    assert main(["pretrain", "vlp", "--config", str(VLP_CONFIG), "--out", str(run / "r"), *tiny(text_model),
                 "max_steps=1", f"data.cache={run / 'cache'}"]) == 0
    return run / "cache"


def _ar_cmd(cache: Path, out: Path, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "voxseq.cli", "pretrain", "ar", "--config", str(AR_CONFIG), "--out", str(out), *AR_TINY,
            "checkpoint_every=2", "keep_checkpoints=2", f"max_steps={max_steps}", f"data.cache={cache}"]


def _vlp_cmd(cache: Path, text: Path, out: Path, max_steps: int) -> list[str]:
    return [sys.executable, "-m", "voxseq.cli", "pretrain", "vlp", "--config", str(VLP_CONFIG), "--out", str(out),
            *tiny(text), "checkpoint_every=2", "keep_checkpoints=2", f"max_steps={max_steps}", f"data.cache={cache}"]


@pytest.mark.parametrize("kills,max_steps,seed", [
    (2, 10, 0),
    pytest.param(6, 30, 1, marks=pytest.mark.slow),
    pytest.param(6, 30, 2, marks=pytest.mark.slow),
])
def test_pretrain_ar_survives_kill_9(tmp_path, ar_cache, kills, max_steps, seed):
    _finish(_ar_cmd(ar_cache, tmp_path / "full", max_steps))
    at_kill = kill_and_resume(_ar_cmd(ar_cache, tmp_path / "cut", max_steps), tmp_path / "cut", kills, seed)
    print(f"(furthest logged step, checkpoint) at each kill: {at_kill}")
    assert len(at_kill) == kills and at_kill[-1][0] < max_steps - 1
    _assert_same_run(tmp_path / "cut", tmp_path / "full", max_steps)


@pytest.mark.parametrize("kills,max_steps,seed", [
    (2, 8, 0),
    pytest.param(6, 24, 1, marks=pytest.mark.slow),
    pytest.param(6, 24, 2, marks=pytest.mark.slow),
])
def test_pretrain_vlp_survives_kill_9(tmp_path, vlp_cache, text_model, kills, max_steps, seed):  # noqa: F811
    _finish(_vlp_cmd(vlp_cache, text_model, tmp_path / "full", max_steps))
    at_kill = kill_and_resume(_vlp_cmd(vlp_cache, text_model, tmp_path / "cut", max_steps), tmp_path / "cut", kills, seed)
    print(f"(furthest logged step, checkpoint) at each kill: {at_kill}")
    assert len(at_kill) == kills and at_kill[-1][0] < max_steps - 1
    _assert_same_run(tmp_path / "cut", tmp_path / "full", max_steps)


# ---------------------------------------------------------------------------- torchrun --max-restarts


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _torchrun(port: int, restarts: int, rendezvous: str) -> list[str]:
    where = ["--master_port", str(port)] if rendezvous == "static" else \
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *where, "--max-restarts", str(restarts),
            "--monitor-interval", "0.5", "-m", "voxseq.cli"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
@pytest.mark.parametrize("kind,rendezvous", [("ar", "static"), ("vlp", "c10d")])
def test_torchrun_restarts_after_a_killed_worker(tmp_path, request, kind, rendezvous):
    port = 29547 if kind == "ar" else 29557
    if kind == "ar":
        cmd = lambda out: _ar_cmd(request.getfixturevalue("ar_cache"), out, 12)[3:]  # noqa: E731
    else:
        text, cache = request.getfixturevalue("text_model"), request.getfixturevalue("vlp_cache")
        cmd = lambda out: _vlp_cmd(cache, text, out, 8)[3:]  # noqa: E731
    max_steps = 12 if kind == "ar" else 8
    _finish([*_torchrun(port, 0, rendezvous), *cmd(tmp_path / "full"), "distributed=ddp"])

    run = tmp_path / "cut"
    proc = subprocess.Popen([*_torchrun(port, 1, rendezvous), *cmd(run), "distributed=ddp", "--resume"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        t0 = time.monotonic()
        while proc.poll() is None and _checkpoint_step(run) < 2 and time.monotonic() - t0 < TIMEOUT_S:
            time.sleep(0.01)
        workers = _children(proc.pid)
        assert proc.poll() is None and len(workers) == 2, "the run ended before a worker could be killed"
        killed_at = _max_logged(run)
        os.kill(workers[-1], signal.SIGKILL)  # one worker dies; the agent must restart the group
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = out.decode(errors="replace")
    (tmp_path / "torchrun.log").write_text(log, encoding="utf-8")
    assert proc.returncode == 0, f"{tmp_path / 'torchrun.log'}: {log[-3000:]}"
    assert "SIGKILL" in log or "Signals.SIGKILL" in log or "exitcode: -9" in log, log[-3000:]
    assert killed_at < max_steps - 1
    _assert_same_run(run, tmp_path / "full", max_steps)
