"""``butd train`` stopped by SIGINT / SIGTERM: it checkpoints the iteration in hand, says where
it stopped and how to resume, and exits 128 + the signal number (SIGTERM to a real subprocess;
the SIGINT path of the same handler in process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from butd.cli.train import StopSignals
from butd.detector.synth import write_synthetic_set
from butd.detector.train.checkpoint import latest_checkpoint

# Generous bound for a loaded CI machine; the run normally reacts within one iteration.
_WAIT_S = 240


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_set(tmp_path_factory.mktemp("synth"), 4, 11, progress=False).out


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(
    scenes: Path, tmp_path: Path
) -> None:
    signum = signal.SIGTERM
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "butd.cli.main", "train", "--data", str(scenes)]
    argv += ["--config", "demo", "--out", str(out), "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait until the loop runs (BN calibration comes first)
            seen.append(line)
            if "training from iteration 0" in line:
                break
        else:
            pytest.fail("training never started:\n" + "".join(seen))
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=_WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, stderr
    point = latest_checkpoint(out)
    assert point is not None and point.iteration >= 1
    assert point.weights.exists()
    assert f"stopped by {signum.name} at iteration {point.iteration} of 7000" in stdout
    assert f"checkpoint {point.weights}" in stdout
    resume = f"butd train --data {scenes} --config demo --out {out} --resume --threads 1"
    assert f"continue with: {resume}" in stdout, stdout
    assert "saving a checkpoint" in stderr


def test_first_ctrl_c_asks_to_stop_and_a_second_interrupts_at_once() -> None:
    """The SIGINT side of the same handler, in process (the subprocess test covers SIGTERM)."""
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.name == "SIGINT" and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
