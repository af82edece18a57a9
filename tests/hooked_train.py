"""
train.py with a test's interruption built in: `python tests/hooked_train.py HOOK=N TRAIN_ARGS...`, also as the script
that torchrun starts. The hook replaces a train.py function before train.main runs, so production code holds none:

  park=N           after step N, print "test hook: parked after step N" and wait (up to 60 s) for a signal, so that
                   a SIGKILL / SIGTERM lands between two steps
  kill-in-save=N   SIGKILL in the middle of the N-th checkpoint write (half the temporary file on disk, not renamed)
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import train  # noqa: E402


def park_after(n):
    def after_step(step, stop):
        if step == n:
            print(f"test hook: parked after step {step}", flush=True)
            t = time.time()
            while not stop and time.time() - t < 60:
                time.sleep(0.02)
    return after_step


def kill_in_save(n):
    calls = []
    save = train.save_checkpoint

    def save_checkpoint(path, obj):
        calls.append(path)
        if len(calls) == n:
            tmp = path + ".tmp"
            torch.save(obj, tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        save(path, obj)
    return save_checkpoint


if __name__ == "__main__":
    hook, _, n = sys.argv[1].partition("=")
    if hook == "park":
        train.after_step = park_after(int(n))
    elif hook == "kill-in-save":
        train.save_checkpoint = kill_in_save(int(n))
    else:
        raise SystemExit(f"unknown hook {sys.argv[1]!r}")
    train.main(sys.argv[2:])
