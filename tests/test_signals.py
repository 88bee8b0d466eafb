"""Stopping on a signal: the flag, the atomic note, and real MPI ranks agreeing.

Run as a script (``mpiexec -n 2 python tests/test_signals.py OUT``) this file is
the rank program: ranks of different speeds loop over "batches"; a signal sent
to one rank's process must make every rank stop at the same batch boundary
and exit with EXIT_REQUEUE.
"""

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
TIMEOUT = 120


def test_flag_sets_only_on_stop_signals_and_restores_handlers():
    from hpcllm.signals import StopFlag

    def previous(signum, frame):
        previous.calls += 1
    previous.calls = 0
    old = signal.signal(signal.SIGUSR1, previous)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        with StopFlag() as stop:
            assert not stop and stop.signum is None and not stop.should_stop()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.signum == signal.SIGUSR1 and stop
            assert stop.should_stop() and stop.agreed_signum == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGTERM)   # caught: the test process survives
            assert stop.signum == signal.SIGTERM
        assert previous.calls == 0
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is old_term
        os.kill(os.getpid(), signal.SIGUSR1)
        assert previous.calls == 1
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_stop_note_is_written_atomically(tmp_path):
    from hpcllm.signals import read_stop_note, write_stop_note
    from hpcllm.store.layout import STOP_NOTE

    assert read_stop_note(tmp_path) is None
    path = write_stop_note(tmp_path, {"completed_shards": [0, 2], "signal": signal.SIGUSR1, "rank": 0})
    assert path == str(tmp_path / STOP_NOTE)
    note = json.loads((tmp_path / STOP_NOTE).read_text())
    assert note["completed_shards"] == [0, 2] and note["signal"] == "SIGUSR1" and note["rank"] == 0
    assert note["pid"] == os.getpid() and note["time"][:2] == "20"
    assert read_stop_note(tmp_path) == note
    assert os.listdir(tmp_path) == [STOP_NOTE]   # no temporary left behind


def _wait_for(paths, proc, timeout):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"ranks ended before starting: rc={proc.returncode}\n{proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"ranks did not start within {timeout}s")
        time.sleep(0.05)


def _run_and_signal(tmp_path, signum, target_rank):
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(TIMEOUT))
    proc = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, HERE, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for([tmp_path / f"progress.{r}" for r in (0, 1)], proc, TIMEOUT)
        time.sleep(0.3)   # let both ranks run a few batches
        os.kill(int((tmp_path / f"pid.{target_rank}").read_text()), signum)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def _check_agreement(tmp_path, signum, target_rank, rc, err):
    from hpcllm.signals import EXIT_REQUEUE, read_stop_note

    assert rc == EXIT_REQUEUE, err[-3000:]
    stopped = [json.loads((tmp_path / f"stopped.{r}").read_text()) for r in (0, 1)]
    # Both ranks left the loop at the same batch boundary, after real progress.
    assert stopped[0]["batch"] == stopped[1]["batch"] > 0
    # Only the signalled rank received it; both agreed on it.
    assert stopped[target_rank]["received"] == signum
    assert stopped[1 - target_rank]["received"] is None
    assert stopped[0]["agreed"] == stopped[1]["agreed"] == signum
    note = read_stop_note(tmp_path)
    assert note["batch"] == stopped[0]["batch"] and note["signal"] == signal.Signals(signum).name


def test_usr1_to_one_rank_stops_both_at_same_batch(tmp_path):
    rc, out, err = _run_and_signal(tmp_path, signal.SIGUSR1, target_rank=1)
    _check_agreement(tmp_path, signal.SIGUSR1, 1, rc, err)


def test_term_to_one_rank_stops_both_at_same_batch(tmp_path):
    rc, out, err = _run_and_signal(tmp_path, signal.SIGTERM, target_rank=0)
    _check_agreement(tmp_path, signal.SIGTERM, 0, rc, err)


def _rank_main(out_dir):
    """Rank program: rank r takes (r+1) x 20 ms per batch; agree at each boundary."""
    from mpi4py import MPI

    from hpcllm.signals import EXIT_REQUEUE, StopFlag, write_stop_note

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    with StopFlag() as stop:
        with open(os.path.join(out_dir, f"pid.{rank}"), "w") as f:
            f.write(str(os.getpid()))
        for batch in range(100_000):
            if stop.should_stop(comm):
                with open(os.path.join(out_dir, f"stopped.{rank}"), "w") as f:
                    json.dump({"batch": batch, "received": stop.signum, "agreed": stop.agreed_signum}, f)
                if rank == 0:
                    write_stop_note(out_dir, {"batch": batch, "signal": stop.agreed_signum, "rank": rank})
                return EXIT_REQUEUE
            time.sleep(0.02 * (rank + 1))
            if batch == 1:
                open(os.path.join(out_dir, f"progress.{rank}"), "w").close()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
