"""Compute threads that follow the machine's load (`onepeace.train.threads`, used by `onepeace demo`)."""
import torch
import pytest

from onepeace.train.threads import LoadFollowingThreads, threads_for_load, usable_cores


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, load, own, expected", [
    (2, 2.1, 2, 2),   # only us: keep both cores
    (2, 0.3, 1, 2),   # idle machine, one thread so far: take the second core
    (2, 3.3, 2, 1),   # one other busy job: one core is left
    (2, 6.0, 2, 1),   # heavily loaded: never fewer than one
    (8, 5.0, 1, 4),   # 4 cores held by others: 4 left
    (4, 0.0, 8, 4),   # never more than the cores
])
def test_threads_fit_the_cores_the_other_jobs_leave(cores, load, own, expected):
    assert threads_for_load(cores, load, own) == expected


def test_the_hook_follows_the_load_every_n_steps_and_says_so():
    loads = iter([0.2, 5.5, 5.5, 1.2])
    said = []
    follow = LoadFollowingThreads(every=10, cores=2, log=said.append, loadavg=lambda: (next(loads), 0.0, 0.0),
                                  clock=lambda: 0.0)  # the clock stands still: only the step count reads the load
    torch.set_num_threads(1)
    follow(1, {})  # step 1: load 0.2 with our 1 thread -> 2 threads
    assert torch.get_num_threads() == 2
    for step in range(2, 10):
        follow(step, {})  # not a multiple of 10: the load is not read (the iterator is not advanced)
    follow(10, {})  # load 5.5 -> 1 thread
    assert torch.get_num_threads() == 1
    follow(20, {})  # 5.5 again (our 1 thread in it): still 1, no new line
    follow(30, {})  # 1.2 with our 1 thread: the others hold 0.2 -> 2 again
    assert torch.get_num_threads() == 2
    assert [c[:2] for c in follow.changes] == [(1, 2), (10, 1), (30, 2)]
    assert len(said) == 3 and "load average 5.5 on 2 cores: 1 compute thread (was 2)" in said[1]


def test_slow_steps_read_the_load_by_the_clock():
    # a job starts beside ours and a step takes 16 s: the load is read again after `seconds`, not 20 steps
    now = [0.0]
    loads = iter([1.9, 3.0])
    follow = LoadFollowingThreads(every=20, cores=2, log=None, loadavg=lambda: (next(loads), 0.0, 0.0),
                                  seconds=15.0, clock=lambda: now[0])
    torch.set_num_threads(2)
    follow(1, {})  # load 1.9 = our own 2 threads: stays 2
    assert torch.get_num_threads() == 2
    now[0] = 10.0
    follow(2, {})  # 10 s later: not yet
    now[0] = 26.0
    follow(3, {})  # 16 s after the last reading: load 3.0 -> another job holds a core -> 1 thread
    assert torch.get_num_threads() == 1 and follow.changes == [(3, 1, 3.0)]


def test_without_a_load_average_nothing_changes():
    torch.set_num_threads(1)
    follow = LoadFollowingThreads(cores=2, log=None, loadavg=None)
    follow._loadavg = None  # a platform without os.getloadavg
    assert follow.update() == 1 and torch.get_num_threads() == 1 and follow.changes == []
    assert usable_cores() >= 1


def test_the_demo_keeps_a_thread_count_the_user_chose(monkeypatch):
    from onepeace.demo.run import compute_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert compute_threads(1) is None and torch.get_num_threads() == 1  # --threads 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert compute_threads(None) is None and torch.get_num_threads() == 2  # OMP_NUM_THREADS set: untouched
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert isinstance(compute_threads(None), LoadFollowingThreads)
