"""Progress bars: a terminal gets live redraws, a log file a line now and then."""

from __future__ import annotations

import io
import time

from ichscan.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_is_not_flooded_with_redraws() -> None:
    log = io.StringIO()
    bar = progress_bar(range(60), file=log, desc="prepare")
    assert bar.mininterval == LOG_INTERVAL_S
    for _ in bar:
        time.sleep(0.01)  # 0.6 s: plain tqdm would redraw five or six times
    # the opening line and the closing one, not a redraw every tenth of a second
    assert log.getvalue().count("prepare") <= 3
    assert "60/60" in log.getvalue()


def test_a_terminal_keeps_tqdm_s_live_redraws() -> None:
    bar = progress_bar(range(3), file=_Terminal())
    assert bar.mininterval < 1
    bar.close()


def test_an_explicit_interval_wins() -> None:
    bar = progress_bar(range(3), file=io.StringIO(), mininterval=0.5)
    assert bar.mininterval == 0.5
    bar.close()
