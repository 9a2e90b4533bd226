"""What the command line says when the user's input is wrong, and resume-setting warnings."""

import subprocess
import sys
from pathlib import Path

from callbacks.resume import schedule_differences

REPO = Path(__file__).resolve().parents[1]


def test_a_data_error_prints_one_message_and_exits_2(tmp_path):
    missing = tmp_path / "no_such_folder"
    finished = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/default_config.yaml",
         f"--data.path={missing}", f"--training.save_dir={tmp_path / 'checkpoints'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert f"DataFormatError: Data path '{missing}' does not exist" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_changed_max_epochs_is_named_with_the_kept_schedule():
    checkpoint = {"lr_schedulers": [{"T_max": 8, "last_epoch": 3}]}
    assert schedule_differences(checkpoint, 3) == [
        "trainer.max_epochs 8 -> 3 (the cosine learning-rate schedule keeps T_max=8 from the "
        "checkpoint)"]
    assert schedule_differences(checkpoint, 8) == []
    assert schedule_differences({"lr_schedulers": []}, 3) == []
