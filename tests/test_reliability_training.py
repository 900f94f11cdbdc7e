"""Hardening of training: non-finite losses, atomic checkpoints, kill-and-resume.

Every test here is a row of ``docs/reliability.md``.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import run
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver

import monai_ipear
from monai_ipear.data import SyntheticRegistrationDataset
from monai_ipear.engines import AtomicCheckpointSaver, RegistrationTrainIteration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


class _BadAt:
    """The bundle's loss, returning ``value`` (NaN or Inf) from call ``at`` on."""

    def __init__(self, at: int, value: float) -> None:
        self.loss = monai_ipear.RegistrationLoss(spatial_dims=2, ncc_kernel_size=5)
        self.at, self.value, self.calls = at, value, 0

    @property
    def last_terms(self) -> dict:
        return self.loss.last_terms

    def __call__(self, warped, fixed, ddf):
        self.calls += 1
        loss = self.loss(warped, fixed, ddf)
        return loss * self.value if self.calls >= self.at else loss


def _trainer(tmp_path, loss, max_epochs=1, saver_cls=AtomicCheckpointSaver, num_pairs=3):
    torch.manual_seed(0)
    net = monai_ipear.RPNet(spatial_dims=2)
    data = SyntheticRegistrationDataset(num_pairs=num_pairs, spatial_dims=2, spatial_size=32, num_labels=3)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=torch.utils.data.DataLoader(data, batch_size=1),
                                network=net, optimizer=opt, loss_function=loss, iteration_update=RegistrationTrainIteration(),
                                decollate=False)
    saver = saver_cls(save_dir=str(tmp_path), save_dict={"model": net, "optimizer": opt}, save_final=True,
                      final_filename="model_final.pt", save_interval=1, n_saved=1, epoch_level=True)
    saver.attach(trainer)
    return trainer, net


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_with_a_clear_message_and_finite_weights(tmp_path, value):
    trainer, net = _trainer(tmp_path, _BadAt(at=3, value=value))
    snapshots = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: snapshots.append({k: v.clone() for k, v in net.state_dict().items()}))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss -?(nan|inf) at epoch 1, iteration 3 .*loss terms: \{'similarity'"):
        trainer.run()
    assert len(snapshots) == 2  # iterations 1 and 2 completed; 3 stopped before backward / step
    now = net.state_dict()
    assert all(torch.isfinite(v).all() for v in now.values())
    assert all(torch.equal(now[k], snapshots[-1][k]) for k in now)  # the step of iteration 3 never happened
    # the checkpoint MONAI's saver writes on the exception holds these finite weights
    saved = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(saved[k], now[k]) for k in now)


def _crash_during_save(monkeypatch):
    real_save = torch.save

    def broken(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a checkpoint")
        else:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated crash while saving)")

    monkeypatch.setattr(torch, "save", broken)
    return real_save


@pytest.mark.parametrize("saver_cls, survives", [(AtomicCheckpointSaver, True), (CheckpointSaver, False)])
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, saver_cls, survives):
    """AtomicCheckpointSaver: the previous model_final.pt stays loadable and unchanged. MONAI's own
    CheckpointSaver (non-atomic) is shown corrupting it, so the test can tell the two apart."""
    net = torch.nn.Linear(3, 2)
    engine = Engine(lambda e, b: None)
    saver = saver_cls(save_dir=str(tmp_path), save_dict={"model": net}, save_final=True,
                      final_filename="model_final.pt")
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    good = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    _crash_during_save(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        engine.run([0], max_epochs=1)
    monkeypatch.undo()
    if survives:
        loaded = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)  # one object: bare
        assert all(torch.equal(loaded[k], good[k]) for k in good)
        assert sorted(os.listdir(tmp_path)) == ["model_final.pt"]  # no temporary file left behind
    else:
        with pytest.raises(Exception):
            torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- kill and resume through the bundle

MAX_EPOCHS = 3
PAIRS = 4
OVERRIDES = {
    "spatial_dims": 3,
    "synthetic#spatial_size": 16,
    "synthetic#num_labels": 3,
    "num_train_pairs": PAIRS,
    "num_val_pairs": 1,
    "val_interval": 1000,  # no validation: the run is only the training loop
    "lr_step_size": 1,
    "max_epochs": MAX_EPOCHS,
    "train#dataloader#shuffle": False,
}


def _bundle_args(root, **extra):
    args = {"config_file": [os.path.join(CONFIGS, "train.json"), os.path.join(CONFIGS, "variants", "rpnet.json")],
            "meta_file": os.path.join(CONFIGS, "metadata.json"), "logging_file": os.path.join(CONFIGS, "logging.conf"),
            "bundle_root": str(root), "device": "cpu", **OVERRIDES}
    args.update(extra)
    return args


def _final_model(root):
    return torch.load(os.path.join(root, "models", "model_final.pt"), map_location="cpu", weights_only=True)


def test_killed_run_resumed_from_its_checkpoint_ends_with_the_same_weights(tmp_path):
    # 1) uninterrupted, in this process
    full = tmp_path / "full"
    run(**_bundle_args(full))
    reference = _final_model(full)
    assert reference["trainer"]["iteration"] == MAX_EPOCHS * PAIRS  # ignite saves the iteration

    # 2) the same run in a subprocess, SIGKILLed as soon as its first epoch checkpoint exists
    killed = tmp_path / "killed"
    args = _bundle_args(killed)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(args.pop("config_file"))]
    for k, v in args.items():
        cmd += [f"--{k}", repr(v) if isinstance(v, (str, bool)) else str(v)]  # fire: False, not false
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: the shared CPU can be very loaded
    pattern = str(killed / "models" / "checkpoint_epoch=*.pt")
    while not glob.glob(pattern) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not (killed / "models" / "model_final.pt").exists()  # killed: no final checkpoint
    latest = max(glob.glob(pattern), key=lambda p: int(p.rsplit("=", 1)[1][:-3]))
    done = torch.load(latest, map_location="cpu", weights_only=True)["trainer"]["iteration"] // PAIRS
    assert 1 <= done < MAX_EPOCHS

    # 3) resume with the README's recipe (--resume true, default ckpt_path = the checkpoint folder): the newest
    # checkpoint, that epoch file, is taken and the run finishes the remaining epochs with the same max_epochs
    run(**_bundle_args(killed, resume=True))
    resumed = _final_model(killed)
    assert resumed["trainer"]["iteration"] == reference["trainer"]["iteration"] == MAX_EPOCHS * PAIRS
    for part in ("model", "optimizer", "lr_scheduler"):
        assert set(resumed[part]) == set(reference[part])
    for k, v in reference["model"].items():
        assert torch.equal(resumed["model"][k], v), k  # bit-identical on CPU with the same thread count
    assert resumed["lr_scheduler"]["last_epoch"] == reference["lr_scheduler"]["last_epoch"] == MAX_EPOCHS

    # 4) resuming a checkpoint that is already past max_epochs is refused with MONAI's message
    with pytest.raises(RuntimeError) as info:  # the bundle wraps it in "Failed to evaluate ..."
        run(**_bundle_args(tmp_path / "again", resume=True, ckpt_path=str(full / "models" / "model_final.pt"),
                           max_epochs=2))
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, ValueError) and "Epoch count (3) in checkpoint is larger than" in str(cause)
