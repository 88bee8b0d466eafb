"""Run a command at 1/FACTOR of the CPU time it would get: SIGSTOP / SIGCONT in 10 ms slices.

    mpiexec -n 1 python -m hpcllm embed ... : -n 1 python bench/duty.py 3 python -m hpcllm embed ...

The child inherits the MPI environment, so it is that rank of the world; the
benchmark of shard claiming uses it to slow one dp group 3x without a knob
in hpcllm's hot loop.
"""

import os
import signal
import subprocess
import sys
import time


def main():
    factor, cmd = float(sys.argv[1]), sys.argv[2:]
    child = subprocess.Popen(cmd)
    on, off = 0.01, 0.01 * (factor - 1)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    while child.poll() is None:
        time.sleep(on)
        try:
            os.kill(child.pid, signal.SIGSTOP)
            time.sleep(off)
            os.kill(child.pid, signal.SIGCONT)
        except ProcessLookupError:
            break
    sys.exit(child.wait())


if __name__ == "__main__":
    main()
