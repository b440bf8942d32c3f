"""flipray.progress.tqdm: Ray's tqdm_ray inside Ray tasks (bars drawn by the driver, not interleaved), plain tqdm
elsewhere; both iterate everything and take set_postfix.

    .venv/bin/python -m pytest tests/test_progress.py -x -q
"""
import pytest

from flipray.progress import in_ray_worker


def bar_user():
    """A function the way the tasks use bars; made here so that Ray ships it by value (tests/ is not importable)."""
    def use_a_bar(n: int):
        from flipray.progress import in_ray_worker, tqdm
        bar = tqdm(range(n), desc="epoch 1", unit="batch", leave=False)
        seen = []
        for i in bar:
            seen.append(i)
            bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
        return (type(bar).__module__, type(bar).__mro__[1].__module__, seen, in_ray_worker(), bar.n,
                getattr(bar, "_closed", None))
    return use_a_bar


def test_plain_tqdm_outside_ray():
    module, _, seen, worker, n, _ = bar_user()(5)
    assert module.startswith("tqdm") and seen == list(range(5)) and worker is False and n == 5


@pytest.mark.slow
def test_tqdm_ray_inside_a_ray_task(ray_local):
    import ray
    module, base, seen, worker, n, closed = ray.get(ray.remote(num_cpus=1)(bar_user()).remote(7))
    assert base == "ray.experimental.tqdm_ray" and module == "flipray.progress"
    assert seen == list(range(7)) and worker is True and n == 7 and closed is True
    assert in_ray_worker() is False  # the driver
