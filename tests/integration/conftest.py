import pytest

from qpc_node.ops.clock import ManualWallClock, system_wall_ms


@pytest.fixture
def wall() -> ManualWallClock:
    # Starts at the real time: MLS KeyPackage lifetimes are stamped from the system clock.
    return ManualWallClock(system_wall_ms())
