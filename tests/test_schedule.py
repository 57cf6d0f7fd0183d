import pytest

from seqedit.schedule import parse_schedule


def fired(spec: str, upto: int, batch: int = 1, signals_at=()) -> list[int]:
    s = parse_schedule(spec)
    out, prev = [], 0
    for idx in range(batch, upto + 1, batch):
        sig = {"norm_spike"} if idx in signals_at else set()
        if s.due(idx, sig, previous_index=prev):
            out.append(idx)
        prev = idx
    return out


def test_every_and_batches():
    assert fired("every:3", 10) == [3, 6, 9]
    # batch 4 does not divide 10: one check per crossed multiple
    assert fired("every:10", 40, batch=4) == [12, 20, 32, 40]


def test_geometric_at_signal_union_never():
    assert fired("geometric:2", 40) == [1, 2, 4, 8, 16, 32]
    assert fired("at:[1,5,7]", 10) == [1, 5, 7]
    assert fired("at:[5]", 10, batch=3) == [6]
    assert fired("signal:norm_spike", 10, signals_at={4, 9}) == [4, 9]
    assert fired("every:5|signal:norm_spike", 10, signals_at={3}) == [3, 5, 10]
    assert fired("never", 10) == []


@pytest.mark.parametrize("bad", ["every:0", "every:x", "geometric:1", "at:[a]", "sometimes", "signal:", ""])
def test_bad_schedules_are_named(bad):
    with pytest.raises(ValueError, match="allowed forms"):
        parse_schedule(bad)
