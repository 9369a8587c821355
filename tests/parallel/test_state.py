import torch
import torch.distributed as dist

from megatron_exp.parallel import state
from tests.distributed import run_on_ranks


def test_tp_groups_are_adjacent_ranks_and_dp_groups_stride_across_them():
    groups = state.group_members(world_size=8, tp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups["pp"] == [[r] for r in range(8)]
    assert state.grid_coordinates(5, tp=2, dp=4) == (0, 2, 1)


def test_pp_groups_stride_across_tp_and_dp_and_the_embedding_group_joins_first_and_last_stage():
    groups = state.group_members(world_size=8, tp=2, pp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert state.group_members(world_size=8, tp=2, pp=4)["embedding"] == [[0, 6], [1, 7]]
    assert state.group_members(world_size=4, tp=2)["embedding"] == []


def test_serial_grid_is_current_without_initialize():
    grid = state.current()
    assert grid == state.SERIAL and grid.world_size == 1 and grid.rank == 0


def test_use_swaps_the_current_grid_for_a_block():
    virtual = state.virtual(tp=8, tp_rank=3)
    with state.use(virtual):
        assert state.current().tp.size == 8 and state.current().tp.rank == 3
    assert state.current() == state.SERIAL


def _check_grid_of_four_ranks():
    grid = state.current()
    rank = dist.get_rank()
    assert (grid.tp.size, grid.dp.size, grid.pp.size) == (2, 2, 1)
    assert (grid.tp.rank, grid.dp.rank) == (rank % 2, rank // 2)
    assert grid.rank == rank and grid.world_size == 4
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=grid.tp.handle)
    assert x.item() == {0: 1.0, 1: 1.0, 2: 5.0, 3: 5.0}[rank]  # ranks {0,1} and {2,3}
    y = torch.tensor([float(rank)])
    dist.all_reduce(y, group=grid.dp.handle)
    assert y.item() == {0: 2.0, 2: 2.0, 1: 4.0, 3: 4.0}[rank]  # ranks {0,2} and {1,3}


def test_grid_of_four_ranks_with_tp2_dp2():
    run_on_ranks(4, _check_grid_of_four_ranks, tp=2)


def test_destroy_is_idempotent_and_resets_the_grid():
    state.destroy()
    state.destroy()
    assert state.current() == state.SERIAL


def _check_a_pipeline_grid():
    grid, rank = state.current(), dist.get_rank()
    assert (grid.tp.size, grid.dp.size, grid.pp.size) == (1, 2, 2) and grid.rank == rank
    assert (grid.dp.rank, grid.pp.rank) == (rank % 2, rank // 2)
    for handle, members in ((grid.pp.handle, {0: 2, 1: 3, 2: 0, 3: 1}), (grid.embedding, {0: 2, 1: 3, 2: 0, 3: 1})):
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=handle)
        assert x.item() == rank + members[rank]
    if grid.pp.rank == 0:  # the second direction of the pipeline is a group of its own
        dist.send(torch.tensor([float(rank)]), group=grid.pp_backward, group_dst=1)
    else:
        y = torch.zeros(1)
        dist.recv(y, group=grid.pp_backward, group_src=0)
        assert y.item() == rank - 2


def test_grid_of_four_ranks_with_dp2_pp2():
    run_on_ranks(4, _check_a_pipeline_grid, tp=1, pp=2)
