"""SIGTERM handling shared by the CLI and the benchmark scripts."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_run_terminable_ends_a_script_with_one_line_and_exit_code_143() -> None:
    script = textwrap.dedent("""
        import os, signal, time
        from ctrlab.utils.signals import run_terminable

        def main():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                print("not reached")
            finally:
                print("clean-up ran")

        run_terminable(main, "terminated; state kept")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143
    assert done.stdout.splitlines() == ["clean-up ran", "terminated; state kept"]
    assert "Traceback" not in done.stderr


def test_run_terminable_restores_the_previous_handler_after_main() -> None:
    script = textwrap.dedent("""
        import signal
        from ctrlab.utils.signals import run_terminable

        run_terminable(lambda: print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL), "unused")
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
