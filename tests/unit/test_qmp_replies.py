"""QMP replies are checked for shape: a peer answering with the wrong JSON (a list for a dict, a string
for a number, missing keys, negative numbers) is a QMPTransportError naming the command, on one line,
never an AttributeError, KeyError or TypeError escaping from the balloon code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmhooks.apply.qmp import QMPBalloon, QMPTransportError
from kvmhooks.errors import ApplyError
from tests.unit.test_balloon import FakeQMP

U64_MAX = 2**64 - 1


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fake QEMU answering query-balloon and qom-get with whatever ``replies`` holds for them."""
    replies: dict[str, Any] = {}

    def handler(cmd: str, args: dict[str, Any]) -> dict[str, Any] | None:
        return dict(replies[cmd])

    replies["path"] = str(tmp_path / "vm.qmp")
    server = FakeQMP(tmp_path / "vm.qmp", handler)
    yield replies
    server.close()


def _balloon(peer: dict[str, Any]) -> QMPBalloon:
    return QMPBalloon(peer["path"], timeout=2)


BAD_BALLOON_REPLIES = [
    {"return": [1, 2]}, {"return": "actual"}, {"return": 5}, {"return": None}, {"return": {}},
    {"return": {"actual": "268435456"}}, {"return": {"actual": -1}}, {"return": {"actual": True}},
    {"return": {"actual": 1.5}}, {"return": {"actual": None}}, {"return": {"actual": [1]}},
    {"return": {"actual": 2**70}},
]


@pytest.mark.parametrize("reply", BAD_BALLOON_REPLIES, ids=repr)
def test_query_balloon_shape_is_checked(peer: dict[str, Any], reply: dict[str, Any]) -> None:
    peer["query-balloon"] = reply
    with _balloon(peer) as b:
        for call in (b.actual_kib, lambda: b.wait_actual(1024, 0, 0.1)):
            with pytest.raises(QMPTransportError) as exc:
                call()
            msg = str(exc.value)
            assert isinstance(exc.value, ApplyError) and "query-balloon" in msg and "unexpected reply" in msg
            assert "\n" not in msg


def test_query_balloon_good_reply(peer: dict[str, Any]) -> None:
    peer["query-balloon"] = {"return": {"actual": 256 * 1024 * 1024}}
    with _balloon(peer) as b:
        assert b.actual_kib() == 256 * 1024 and b.wait_actual(256 * 1024, 0, 1) == 256 * 1024


BAD_STATS_REPLIES = [
    {"return": [1, 2]}, {"return": "stats"}, {"return": None}, {"return": {}},
    {"return": {"stats": {}}}, {"return": {"last-update": 0}},
    {"return": {"stats": [], "last-update": 0}}, {"return": {"stats": "x", "last-update": 0}},
    {"return": {"stats": {}, "last-update": "0"}}, {"return": {"stats": {}, "last-update": -5}},
    {"return": {"stats": {}, "last-update": True}}, {"return": {"stats": {}, "last-update": 1.5}},
    {"return": {"stats": {"stat-total-memory": "1048576"}, "last-update": 1}},
    {"return": {"stats": {"stat-available-memory": -2}, "last-update": 1}},
    {"return": {"stats": {"stat-free-memory": 1.5}, "last-update": 1}},
    {"return": {"stats": {"stat-free-memory": None}, "last-update": 1}},
    {"return": {"stats": {"stat-free-memory": 2**70}, "last-update": 1}},
]


@pytest.mark.parametrize("reply", BAD_STATS_REPLIES, ids=repr)
def test_guest_stats_shape_is_checked(peer: dict[str, Any], reply: dict[str, Any]) -> None:
    peer["qom-get"] = reply
    with _balloon(peer) as b, pytest.raises(QMPTransportError) as exc:
        b.guest_stats()
    msg = str(exc.value)
    assert "guest-stats" in msg and "unexpected reply" in msg and "\n" not in msg


def test_guest_stats_not_reported_is_left_out(peer: dict[str, Any]) -> None:
    """-1 is QEMU's documented "not reported"; QEMU stores it in a uint64, so it may arrive as 2^64-1."""
    peer["qom-get"] = {"return": {"stats": {"stat-total-memory": 2 * 1024**3, "stat-available-memory": -1,
                                            "stat-free-memory": U64_MAX, "stat-swap-in": 3}, "last-update": 0}}
    with _balloon(peer) as b:
        assert b.guest_stats() == {"last_update": 0, "total": 2 * 1024**2}


def test_an_error_reply_is_one_bounded_line(peer: dict[str, Any]) -> None:
    """qemu.qmp quotes a malformed reply over several lines; the log and `kvmhooks status` want one."""
    peer["query-balloon"] = {"error": "not a dict" + "x" * 5000}
    with _balloon(peer) as b, pytest.raises(QMPTransportError) as exc:
        b.actual_kib()
    msg = str(exc.value)
    assert "\n" not in msg and "query-balloon" in msg and len(msg) < 1000
    assert exc.value.cause is not None  # the root cause is kept for the debug log
