import trio
import trio.testing

from qpc_node.service.delivery import Waiters

R = b"r" * 32


async def test_parked_entries_are_removed_when_waits_end() -> None:
    w = Waiters()
    with trio.move_on_after(0.01), w.parked(R) as ev:
        await ev.wait()
    assert len(w) == 0


async def test_notify_wakes_all_parked_and_table_empties() -> None:
    w = Waiters()
    woken = 0

    async def park() -> None:
        nonlocal woken
        with w.parked(R) as ev:
            await ev.wait()
            woken += 1

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(park)
        await trio.testing.wait_all_tasks_blocked()
        assert len(w) == 1
        w.notify(R)
    assert woken == 3 and len(w) == 0 and w.wakeups == 1


async def test_a_new_parker_after_a_wakeup_gets_a_fresh_event() -> None:
    w = Waiters()
    with w.parked(R) as first:
        w.notify(R)
        assert first.is_set()
        with w.parked(R) as second:
            assert not second.is_set()
        # The woken first waiter leaving must not drop or corrupt the new entry.
    assert len(w) == 0
