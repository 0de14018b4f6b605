"""merit_ds/train/preemption.py in one process: the signal only sets a flag, the first signal wins,
one rank's answer is its own flag, close() puts the old handlers back. (The loop stopping, saving
and resuming bitwise on real ranks is in the slow tier.)"""

import os
import signal

from merit_ds.train.preemption import EXIT_CODE, SIGNALS, Preempted, Preemption


def test_signal_sets_the_flag_and_close_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in SIGNALS}
    p = Preemption()
    try:
        assert p.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not replace the first
        assert p.received == signal.SIGUSR1 and p.requested() == signal.SIGUSR1
    finally:
        p.close()
    assert {s: signal.getsignal(s) for s in SIGNALS} == before


def test_exit_code_and_message():
    assert EXIT_CODE == 143  # 128 + SIGTERM (15), what a shell reports for a process killed by SIGTERM
    assert set(SIGNALS) == {signal.SIGTERM, signal.SIGUSR1}
    e = Preempted(signal.SIGTERM, 7, "out/checkpoints/step_00000007")
    assert (e.signum, e.step) == (signal.SIGTERM, 7)
    assert str(e).startswith("stopped by SIGTERM after step 7; checkpoint out/checkpoints/step_00000007 saved")
    assert "--resume auto" in str(e)
