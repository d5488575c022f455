"""Run a script in N processes under torchrun, as a subprocess of a test.

Why a subprocess: DeepSpeed and torch.distributed keep process-wide state (the process group,
ZeRO hooks, megatron's parallel state), so each multi-process test gets fresh interpreters.

    from tests.dist_utils import run_worker
    result = run_worker("ckpt_worker", "--out", str(tmp_path), tmp_path=tmp_path)

A worker is a plain script under tests/workers/ with an `if __name__ == "__main__":` guard. It
should start its process group with `calm_dist.parallel.launch.init_distributed()` (gloo on CPU,
without DeepSpeed's ~1 minute shm_comm compile), and report results by writing files (e.g. one
JSON per rank into a directory passed as an argument) for the test to assert on.

Each launch costs ~10 s on 2 CPU cores, mostly imports: combine checks into one worker run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from calm_dist.common.processes import kill_process_tree


REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
_TAIL_CHARS = 6000


def free_port() -> int:
    """A TCP port free right now on the loopback interface (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(
    script: str | os.PathLike,
    *args: str,
    nproc: int = 2,
    timeout: float = 120.0,
    tmp_path: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc_per_node nproc script *args` and wait.

    - environment: OMP_NUM_THREADS=1 (the cores are shared), TORCH_EXTENSIONS_DIR inside `tmp_path`
      (or a fresh temp dir) so no JIT build lands in the user's cache, the repository on
      PYTHONPATH, PYTHONFAULTHANDLER=1 (a hang killed by the timeout leaves tracebacks); `env`
      entries are added last;
    - `timeout` (seconds) is hard: torchrun and every rank under it are killed;
    - `check`: raise AssertionError on a non-zero exit or a timeout, with the output's tail.
      With `check=False` the caller inspects `returncode` (-9 after a timeout).
    Returns the CompletedProcess with stdout and stderr as text.
    """
    tmp_root = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="calm-dist-test-"))
    child_env = dict(os.environ)
    child_env.update(
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(tmp_root / "torch_extensions"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONFAULTHANDLER="1",
    )
    child_env.update(env or {})
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *map(str, args),
    ]  # fmt: skip
    # A new session keeps a timeout's kill away from pytest's own process group.
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=child_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_process_tree(process.pid)
        stdout, stderr = process.communicate()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and (timed_out or result.returncode != 0):
        what = f"timed out after {timeout:.0f} s" if timed_out else f"exited with {result.returncode}"
        report = (
            f"{Path(script).name} {what}\n--- stdout (tail) ---\n{stdout[-_TAIL_CHARS:]}"
            f"\n--- stderr (tail) ---\n{stderr[-_TAIL_CHARS:]}"
        )
        print(report)
        raise AssertionError(report)
    return result


def run_worker(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`run_distributed` on tests/workers/<name>.py."""
    return run_distributed(WORKERS / f"{name}.py", *args, **kwargs)
