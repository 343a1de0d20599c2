"""merging_helpers.fast.input_guard: another process that truncates an input during a streaming
merge stops it with an error naming the file, where without the leases the merge dies of SIGBUS."""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from merging_helpers.fast import input_guard
from merging_helpers.fast.input_guard import InputChangedError, InputGuard

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file leases are Linux's")

# run in a child process: the unguarded case kills its process
SCRIPT = '''
import subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from conftest import make_family
from merging_helpers.fast import input_guard
from merging_helpers.fast.streaming import merge_folders
from merging_helpers.recipes import merge_tensor
root, guarded = Path(sys.argv[1]), sys.argv[2] == "guarded"
if not guarded:
    input_guard.InputGuard.protect = lambda self, fd, path: None   # no lease taken
base, experts = make_family(root / "family", "llama", torch.float32, n_experts=2)
victim = experts[1] / "model.safetensors"
seen = []
def merge_and_truncate(name, b, ex, method, **kw):
    seen.append(name)
    if len(seen) == 3:   # another process truncates expert 1's file while this tensor's inputs are mapped
        subprocess.Popen([sys.executable, "-c", f"open({str(victim)!r}, 'r+b').truncate(100)"])
        time.sleep(1.0)
    return merge_tensor(name, b, ex, method, **kw)
merge_folders(base, experts, root / "out", "ties", density=0.5, fused=False, merge_fn=merge_and_truncate,
              progress=False)
print("merged without an error")
'''


def _merge_while_truncated(tmp_path, mode):
    (tmp_path / "case.py").write_text(SCRIPT)
    return subprocess.run([sys.executable, str(tmp_path / "case.py"), str(tmp_path), mode,
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@linux
def test_a_file_truncated_during_a_merge_is_named_not_a_crash(tmp_path):
    run = _merge_while_truncated(tmp_path, "guarded")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "InputChangedError" in run.stderr and "expert1/model.safetensors: another process opened it" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@linux
def test_without_the_leases_the_same_merge_dies_of_sigbus(tmp_path):
    run = _merge_while_truncated(tmp_path, "bare")
    assert run.returncode == -signal.SIGBUS, (run.returncode, run.stderr[-2000:])


@linux
def test_a_broken_lease_is_found_and_the_handler_given_back(tmp_path):
    path = tmp_path / "input.bin"
    path.write_bytes(b"x" * 4096)
    before = signal.getsignal(signal.SIGIO)
    guard = InputGuard().start()
    fd = os.open(path, os.O_RDONLY)
    try:
        guard.protect(fd, path)
        guard.check()  # nobody has asked for the file: nothing to say
        with pytest.raises(BlockingIOError):  # a writer is held off (a non-blocking one fails)...
            os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        with pytest.raises(InputChangedError, match=r"input.bin: another process opened it for writing"):
            guard.check()  # ...and the merge hears of it
    finally:
        os.close(fd)
        guard.stop()
    assert signal.getsignal(signal.SIGIO) is before and not guard.active


def test_outside_the_main_thread_or_without_leases_nothing_is_held(tmp_path, monkeypatch):
    found = []
    thread = threading.Thread(target=lambda: found.append(InputGuard().start().active))
    thread.start()
    thread.join()
    assert found == [False]
    monkeypatch.setattr(input_guard, "fcntl", None)
    guard = InputGuard().start()
    guard.protect(0, tmp_path / "any")
    guard.check()
    guard.stop()
    assert not guard.active
