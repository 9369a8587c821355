"""The pipeline layout and schedules as orders of actions: dependencies met without deadlock, messages between
two stages sent in the order they are received (NCCL matches by order), and the in-flight counts of the paper."""

import itertools

import pytest

from megatron_exp.parallel.pipeline import (
    Action,
    PipelineLayout,
    actions,
    bubble_fraction,
    forward_only,
    peak_in_flight,
)


def test_chunks_are_spread_over_the_stages_round_robin():
    layout = PipelineLayout(stages=2, virtual=2, layers=8)
    assert [layout.chunk_layers(c) for c in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    first, last = layout.part(0), layout.part(1)
    assert first.layers == [0, 1, 4, 5] and first.embeddings and not first.head
    assert last.layers == [2, 3, 6, 7] and last.head and not last.embeddings
    assert PipelineLayout(1, 1, 4).part(0).layers == [0, 1, 2, 3]


def test_bad_layouts_say_why():
    assert "not divisible by parallel.pp x parallel.virtual_stages = 3 x 1" in PipelineLayout(3, 1, 4).validate(
        4, "1f1b"
    )
    assert "needs parallel.schedule=interleaved" in PipelineLayout(2, 2, 8).validate(4, "1f1b")
    assert "multiple of parallel.pp=2" in PipelineLayout(2, 2, 8).validate(3, "interleaved")
    assert PipelineLayout(2, 2, 8).validate(4, "interleaved") is None


def test_the_interleaved_order_is_megatrons():
    # torch.distributed.pipelining's ScheduleInterleaved1F1B gives these (recorded from the library, p=2 v=2 m=4)
    layout = PipelineLayout(stages=2, virtual=2, layers=4)
    assert " ".join(map(str, actions(layout, "interleaved", 4, 0))) == (
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3"
    )
    assert " ".join(map(str, actions(layout, "interleaved", 4, 1))) == (
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3"
    )


def _simulate(layout: PipelineLayout, orders: dict[int, list[Action]]) -> None:
    """Run every stage's order with asynchronous sends and blocking receives; fail on a deadlock."""
    last = layout.chunks - 1
    done: set[Action] = set()
    position = dict.fromkeys(orders, 0)
    while any(position[s] < len(orders[s]) for s in orders):
        progressed = False
        for stage, order in orders.items():
            if position[stage] == len(order):
                continue
            a = order[position[stage]]
            needs = [Action(True, a.chunk - 1, a.micro)] if a.forward and a.chunk > 0 else []
            if not a.forward:
                needs = [Action(True, a.chunk, a.micro)] + ([Action(False, a.chunk + 1, a.micro)] * (a.chunk < last))
            if all(n in done for n in needs):
                done.add(a)
                position[stage] += 1
                progressed = True
        assert progressed, f"deadlock at {position}"


def _messages_in_order(layout: PipelineLayout, orders: dict[int, list[Action]]) -> None:
    """Between two stages, in each direction, the receiver expects messages in the order the sender sends them."""
    last = layout.chunks - 1
    for forward in (True, False):
        sent, expected = {}, {}
        for stage, order in orders.items():
            for a in order:
                if a.forward != forward:
                    continue
                peer_chunk = a.chunk + 1 if forward else a.chunk - 1
                if 0 <= peer_chunk <= last:
                    sent.setdefault((stage, layout.stage_of(peer_chunk)), []).append((peer_chunk, a.micro))
                source_chunk = a.chunk - 1 if forward else a.chunk + 1
                if 0 <= source_chunk <= last:
                    expected.setdefault((layout.stage_of(source_chunk), stage), []).append((a.chunk, a.micro))
        assert sent == expected


CASES = [(p, v, m, s) for p, v, m in itertools.product((1, 2, 4), (1, 2), (1, 2, 4, 8))
         for s in ("gpipe", "1f1b", "interleaved") if PipelineLayout(p, v, 8).validate(m, s) is None]  # fmt: skip


@pytest.mark.parametrize("p, v, m, schedule", CASES)
def test_every_schedule_runs_every_action_once_without_deadlock(p, v, m, schedule):
    layout = PipelineLayout(p, v, 8)
    orders = {stage: actions(layout, schedule, m, stage) for stage in range(p)}
    for stage, order in orders.items():
        assert sorted(order) == sorted(Action(f, c, i) for f in (True, False) for c in layout.chunks_of(stage)
                                       for i in range(m))  # fmt: skip
    _simulate(layout, orders)
    _messages_in_order(layout, orders)
    evaluation = {stage: forward_only(layout, m, stage) for stage in range(p)}
    _simulate(layout, evaluation)
    _messages_in_order(layout, evaluation)


def test_in_flight_micro_batches_per_stage_are_the_papers():
    layout = PipelineLayout(stages=4, virtual=1, layers=8)
    assert [peak_in_flight(layout, "gpipe", 8, s) for s in range(4)] == [8, 8, 8, 8]
    assert [peak_in_flight(layout, "1f1b", 8, s) for s in range(4)] == [4, 3, 2, 1]  # p - stage
    interleaved = PipelineLayout(stages=2, virtual=2, layers=8)
    assert [peak_in_flight(interleaved, "interleaved", 4, s) for s in range(2)] == [5, 3]  # warmup + 1
    assert peak_in_flight(PipelineLayout(layers=8), "1f1b", 8, 0) == 1  # no pipeline: one at a time
    assert bubble_fraction(4, 1, 8) == 3 / 8 and bubble_fraction(4, 2, 8) == 3 / 16
