"""The host buffers loads read into: a block is handed out again only once nothing views it."""

from __future__ import annotations

import gc
import threading

import torch

from node.lora.host_buffer import HostBufferPool

RUNS = (((0, 4), (8, 16)), ((4, 8),))  # buffer ranges of two preadv runs


def test_a_block_comes_back_only_when_the_last_tensor_viewing_it_is_gone() -> None:
    pool = HostBufferPool()
    first, _ = pool.take(16, "plan", RUNS)
    stack = first[4:12].view(torch.float32)  # what the parser keeps: views of the buffer
    del first
    second, _ = pool.take(16, "plan", RUNS)
    assert second.data_ptr() != stack.data_ptr() - 4  # still viewed: not handed out again
    address = stack.data_ptr() - 4
    del stack
    gc.collect()
    assert pool.num_free_bytes == 16
    third, _ = pool.take(16, "plan", RUNS)
    assert third.data_ptr() == address and pool.num_free_bytes == 0


def test_the_iovecs_are_the_buffer_s_own_ranges_for_the_plan_asked() -> None:
    pool = HostBufferPool()
    buffer, iovecs = pool.take(16, "plan", RUNS)
    for i, view in enumerate(v for run in iovecs for v in run):
        view[:] = bytes([i + 1]) * len(view)
    assert buffer.tolist() == [1] * 4 + [3] * 4 + [2] * 8
    address = buffer.data_ptr()
    del buffer, iovecs
    gc.collect()
    again, iovecs = pool.take(16, "other plan", (((0, 16),),))  # the same block, sliced for its new plan
    assert again.data_ptr() == address and [len(v) for run in iovecs for v in run] == [16]


def test_free_blocks_are_kept_within_the_budget() -> None:
    pool = HostBufferPool(max_free_bytes=16)
    taken = [pool.take(16, "plan", RUNS)[0] for _ in range(3)]
    del taken
    gc.collect()
    assert pool.num_free_bytes == 16  # one kept, two freed


def test_loads_on_several_threads_never_share_a_buffer() -> None:
    pool = HostBufferPool(max_free_bytes=64)
    clashes: list[int] = []

    def loads(mark: int) -> None:
        for _ in range(500):
            buffer, _ = pool.take(16, "plan", RUNS)
            buffer.fill_(mark)
            if int(buffer.sum()) != 16 * mark:
                clashes.append(mark)
            del buffer

    threads = [threading.Thread(target=loads, args=(mark,)) for mark in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gc.collect()
    assert clashes == [] and pool.num_free_bytes == sum(16 * len(b) for b in pool._free.values()) <= 64
