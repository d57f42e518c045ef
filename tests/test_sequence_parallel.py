"""Sequence-parallel identification on 2 CPU processes (gloo) against one process: the same gates, an exact
resume, and the halo plan against a brute-force count of which keys each rank reads."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import spawn
from conftest import tiny_llama
from identify_helpers import random_samples
from safetensors.torch import load_file, save_file
from torch.multiprocessing import ProcessRaisedException

from duoattn.identify.parallel import SequenceShard
from duoattn.identify.train import IdentifyConfig, train_gates

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(out: Path, **kwargs) -> IdentifyConfig:
    values = dict(out=str(out), steps=3, lr=0.05, sink=2, recent=8, min_len=97, max_len=97, save_every=1)
    return IdentifyConfig(**{**values, **kwargs})


class Interrupt(Exception):
    pass


def _samples(length: int, num_loss: int, stop_at: int | None):
    sample_fn = random_samples(length, num_loss)

    def fn(step: int):
        if step == stop_at:
            raise Interrupt(f"stopped before step {step}")
        return sample_fn(step)

    return fn


def _train(world, out: str, length: int, num_loss: int, kwargs: dict, stop_at: int | None = None) -> torch.Tensor:
    cfg = _config(Path(out), **kwargs)
    # every head of every layer matters, so gradients cross the ranks through the keys of earlier layers
    model = tiny_llama(num_layers=3, heads=4, kv_heads=2, seed=1)
    try:
        result = train_gates(model, _samples(length, num_loss, stop_at), cfg, cfg.settings(),
                             Path(out) / "checkpoint", progress=False, world=world)
    except Interrupt:
        return None
    if world is None or world.is_main:
        save_file({"gates": result.gates}, str(Path(out) / "gates.safetensors"))
    return result.gates


def _parallel_worker(world, out: str, length: int, num_loss: int, kwargs: dict, stop_at: int | None) -> None:
    gates = _train(world, out, length, num_loss, kwargs, stop_at)
    if gates is not None:  # every rank ends with the gates of rank 0
        save_file({"gates": gates}, str(Path(out) / f"gates-rank{world.rank}.safetensors"))


def _parallel(out: Path, length: int, num_loss: int, stop_at: int | None = None, size: int = 2,
              **kwargs) -> torch.Tensor | None:
    spawn(_parallel_worker, str(out), length, num_loss, kwargs, stop_at, size=size)
    if stop_at is not None:
        return None
    ranks = [load_file(str(out / f"gates-rank{r}.safetensors"))["gates"] for r in range(size)]
    assert all(torch.equal(ranks[0], g) for g in ranks[1:])
    return ranks[0]


@pytest.mark.parametrize(
    "length, num_loss, size, kwargs, atol",
    [
        # odd length (49 + 48), the student spans both ranks, a window much shorter than a rank's slice
        (97, 60, 2, dict(recent=8), 1e-10),
        # a window (24) longer than a rank's slice (17 / 16): rank 1's first queries read every student key of
        # rank 0; recomputation replays the exchange in the backward pass. (Queries below sink + recent = 26 see
        # every earlier key, so no gradient crosses the ranks here; the next case has it.)
        (33, 20, 2, dict(recent=24, min_len=33, max_len=33, checkpointing="on"), 1e-10),
        # three ranks of 17: rank 2's windows reach back to position 11, over the student keys of ranks 0 and 1
        (51, 40, 3, dict(recent=24, min_len=51, max_len=51), 1e-10),
        # budget-aware steps: the ranks binarise the same gates and normalise the summed gradient. The float32
        # gradient summed over ranks differs from one process's in its last bits, and the normalised SGD step is
        # linear in it (Adam's is not), so the gates agree to float32 rounding instead
        (97, 60, 2, dict(steps=4, hard_steps=2, hard_budgets=(0.5, 0.25), hard_lr=0.05), 2e-6),
    ],
)
def test_sequence_parallel_gates_equal_one_process(tmp_path, length, num_loss, size, kwargs, atol):
    one = _train(None, str(tmp_path / "one"), length, num_loss, kwargs)
    many = _parallel(tmp_path / "many", length, num_loss, size=size, **kwargs)
    assert (one < 1).any(), "the gates must move for the comparison to mean anything"
    torch.testing.assert_close(many, one, rtol=0, atol=atol)
    # the student pass starts before the last rank's slice: it runs on several ranks, across their boundaries
    assert length - num_loss < SequenceShard.split(length, size - 1, size).lo


def test_sequence_parallel_resume_repeats_an_uninterrupted_run(tmp_path):
    kwargs = dict(steps=4, save_every=2)
    one = _train(None, str(tmp_path / "one"), 97, 60, kwargs)
    out = tmp_path / "two"
    assert _parallel(out, 97, 60, stop_at=3, **kwargs) is None  # interrupted: the checkpoint of step 2 is left
    state = (out / "checkpoint" / "state.json").read_text()
    assert '"step": 2' in state and not list(out.glob("checkpoint/*.tmp*"))
    resumed = _parallel(out, 97, 60, resume=True, **kwargs)
    torch.testing.assert_close(resumed, one, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ the halo plan
def _reads(start: int, first: int, end: int, sink: int, recent: int) -> set[int]:
    """Every student key position (>= start) that the queries first..end-1 read and do not compute."""
    keys = set()
    for i in range(first, end):
        keys |= {j for j in range(start, i + 1) if j < sink or i - j < recent}
    return {j for j in keys if j < first}


@pytest.mark.parametrize("length, size, start, sink, recent",
                         [(97, 2, 60, 2, 8), (33, 2, 13, 2, 24), (50, 4, 10, 4, 30), (41, 3, 2, 5, 7),
                          (64, 4, 40, 2, 3), (19, 4, 0, 8, 2)])
def test_halo_plan_sends_exactly_the_keys_each_rank_reads(length, size, start, sink, recent):
    shards = [SequenceShard.split(length, r, size) for r in range(size)]
    received = {r: [] for r in range(size)}
    sent = {}
    for shard in shards:
        receives, sends = shard.halo_plan(start, sink, recent)
        for p, a, b in receives:
            received[shard.rank].extend(range(a, b))
        for q, a, b in sends:
            sent[(shard.rank, q)] = (a, b)
            # a rank sends only keys it computes
            assert shard.first(start) <= a < b <= shard.hi
    for shard in shards:
        r = shard.rank
        if not shard.computes(start):
            assert received[r] == []
            continue
        got = received[r]
        assert got == sorted(set(got)), "each key once, in position order"
        # a contiguous range that covers every key the rank reads (it may also hold unread keys between the
        # sink and the window, when the sink extends past the start)
        need = _reads(start, shard.first(start), shard.hi, sink, recent)
        assert need <= set(got)
        if got:
            assert got == list(range(got[0], shard.first(start)))
            assert got[0] == min(need)
    # every receive has the matching send
    for shard in shards:
        for p, a, b in shard.halo_plan(start, sink, recent)[0]:
            assert sent[(p, shard.rank)] == (a, b)


def test_split_is_contiguous_and_even():
    for length, size in itertools.product((7, 8, 33, 97), (1, 2, 3, 4)):
        shards = [SequenceShard.split(length, r, size) for r in range(size)]
        sizes = [s.hi - s.lo for s in shards]
        assert sum(sizes) == length and max(sizes) - min(sizes) <= 1 and shards[0].lo == 0
        assert all(a.hi == b.lo for a, b in zip(shards, shards[1:]))
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        SequenceShard.split(3, 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        SequenceShard.split(8, 2, 2)


# ------------------------------------------------------------------------------------------------ failures
def _failing_worker(world, out: str, how: str) -> None:
    cfg = _config(Path(out), steps=3)
    model = tiny_llama(num_layers=2, heads=4, kv_heads=2, seed=1)
    samples = random_samples(97, 60)

    def sample_fn(step: int):
        if world.rank == 1 and step == 1:
            if how == "hang":
                time.sleep(120)  # never joins the next collective
            raise RuntimeError("rank 1 failed while drawing its sample")
        return samples(step)

    train_gates(model, sample_fn, cfg, cfg.settings(), Path(out) / "checkpoint", progress=False, world=world)


@pytest.mark.parametrize("how", ["hang", "raise"])
def test_a_failing_rank_stops_the_job_with_a_clear_error(tmp_path, how):
    tic = time.monotonic()
    with pytest.raises(ProcessRaisedException) as info:
        spawn(_failing_worker, str(tmp_path / "out"), how, timeout_s=3.0)
    elapsed = time.monotonic() - tic
    assert elapsed < 40, f"the job took {elapsed:.0f} s to stop"
    message = str(info.value)
    if how == "hang":  # rank 0 waits in a collective for the timeout, then stops with an error that says so
        assert "CollectiveError" in message and "rank 0 of 2" in message and "3 s timeout" in message
    else:  # the failing rank's own error, or the other rank's that names the stop: whichever is seen first
        assert "rank 1 failed while drawing its sample" in message or (
            "CollectiveError" in message and "rank 0 of 2" in message and "another rank stopped" in message)


# ------------------------------------------------------------------------------------------- end to end
def _identify_worker(world, out: str, haystack: str) -> None:
    from test_identify_run import run

    result = run(Path(out), Path(haystack))
    assert result.written == world.is_main


def test_identify_on_two_ranks_writes_once_and_matches_one_process(tmp_path):
    from test_identify_data import TEXT
    from test_identify_run import run

    from duoattn import HeadPattern

    haystack = tmp_path / "domain.txt"
    haystack.write_text(TEXT, encoding="utf-8")
    one = run(tmp_path / "one", haystack).pattern
    spawn(_identify_worker, str(tmp_path / "two"), str(haystack))
    two = HeadPattern.load(tmp_path / "two")
    assert (one.gates < 1).any()
    np.testing.assert_allclose(two.gates, one.gates, rtol=0, atol=1e-10)
    assert two.metadata["sequence_parallel"] == 2 and one.metadata["sequence_parallel"] == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


# ---------------------------------------------------------------------------------------------- process group
def test_init_world_outside_torchrun_says_how_to_start(monkeypatch):
    from duoattn.distributed import init_world, launched

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not launched()
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; start the job with "
                                           "torchrun --nproc-per-node N"):
        init_world("cpu")
    with pytest.raises(ValueError, match="timeout_s must be > 0 seconds, got 0"):
        init_world("cpu", timeout_s=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()


def test_collective_errors_rename_backend_failures_only():
    from duoattn.distributed import CollectiveError, World, collective_errors

    world = World(rank=1, size=2, local_rank=1, device=torch.device("cpu"), timeout_s=7)
    with pytest.raises(CollectiveError, match=r"rank 1 of 2: the student pass failed: .* within the 7 s timeout "
                                              r"\(RuntimeError: Timed out waiting 7000ms"):
        with collective_errors(world, "the student pass"):
            raise RuntimeError("Timed out waiting 7000ms for recv operation to complete")
    with pytest.raises(ValueError, match="a shape error"):  # not a backend failure: left as it is
        with collective_errors(world, "the student pass"):
            raise ValueError("a shape error")
