import numpy as np

from bench.loadgen import LoadPoint, Window, best_rate_under, is_stable, percentile_ci


def window(throughput: float, p50: float) -> Window:
    count = int(throughput)
    return Window(seconds=1.0, latencies_ms=[p50] * count, errors=0, server={}, client_cpu_s=0.1)


def test_percentile_ci_brackets_the_true_quantile_most_of_the_time():
    rng, hits = np.random.default_rng(0), 0
    for _ in range(200):
        sample = np.sort(rng.exponential(1.0, 400))
        low, high = percentile_ci(sample, 0.99)
        hits += low <= -np.log(0.01) <= high
    assert 0.85 <= hits / 200 <= 1.0  # a 95% interval
    low, high = percentile_ci(np.arange(1000.0), 0.5)
    assert low < 500 < high and high - low < 100


def test_stability_needs_three_windows_that_agree_on_throughput_and_latency():
    assert not is_stable([window(100, 5), window(100, 5)], 0.1)
    assert is_stable([window(80, 9), window(100, 5), window(103, 5.2), window(98, 5.1)], 0.1)
    assert not is_stable([window(100, 5), window(100, 5), window(100, 6)], 0.1)  # p50 off by 20%
    assert not is_stable([window(100, 5), window(130, 5), window(100, 5)], 0.1)  # throughput off by 30%


def test_best_rate_is_the_highest_within_the_p99_budget_without_errors():
    points = [
        LoadPoint("m", "grpc", "rate", rate, latency_ms={"p99": p99}, errors=errors)
        for rate, p99, errors in [(50, 5, 0), (100, 9, 0), (200, 40, 0), (400, 8, 3)]
    ]
    assert best_rate_under(points, 10).load == 100
    assert best_rate_under(points, 1) is None
