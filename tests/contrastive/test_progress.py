"""The trainer's progress line: throughput per interval and an ETA from the steady rate only."""

from contrastive.metric_logging import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_eta_uses_the_steady_rate_and_leaves_out_the_warm_up_and_paused_time():
    clock = Clock()
    progress = Progress(total_steps=100, first_step=0, examples_per_step=10, devices=2, clock=clock)
    clock.now = 30.0  # steps 1-10: compiling, 30 s
    assert progress.rate(10) == 100 / 30
    assert "ETA after warm-up" in progress.line(10, 1.0, 100 / 30)
    clock.now = 31.0  # steps 11-20: 100 examples in 1 s
    assert progress.rate(20) == 100.0
    # 80 steps of 10 examples at 100 examples/s: 8 s.
    assert progress.line(20, 0.5, 100.0).endswith("100.0 img/s (50.0/device) | ETA 0m08s")
    clock.now = 61.0  # a 30 s evaluation and checkpoint, then the clock restarts
    progress.restart_clock(20)
    clock.now = 61.5  # steps 21-25: 50 examples in 0.5 s
    assert progress.rate(25) == 100.0
    assert progress.steady_rate == 100.0  # the pause counts nowhere


def test_one_slow_interval_moves_the_eta_by_its_share_of_the_steady_time():
    clock = Clock()
    progress = Progress(total_steps=1000, first_step=0, examples_per_step=1, devices=1, clock=clock)
    clock.now = 5.0
    progress.rate(10)  # warm-up
    for end in (100, 190, 280):  # 90 steps a second
        clock.now += 1.0
        progress.rate(end)
    clock.now += 1.0  # 10 steps in a second (e.g. a background save competing)
    assert progress.rate(290) == 10.0
    # Steady: 280 examples over 4 s = 70/s, not the last interval's 10/s.
    assert progress.steady_rate == 70.0
