"""Crash safety of everything that writes host state: kill it or fail its writes at every step, recover, and
check the invariant: every pool = the admin's value + pages held by live reservations, nothing below the
admin's value, nothing lost when everything is released.

A "step" is one write that matters: a ledger commit (``Ledger._write``) or a pool write (``SysfsPools.set``).
The matrix kills the operation with SIGKILL in a child process at each step, or fails that write with ENOSPC or
EIO; the property test does random sequences with crashes at random steps (in-process: after the crash the
"dead" process writes nothing more, which is what SIGKILL guarantees).
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvmhooks import operations
from kvmhooks.apply.pools import SysfsPools
from kvmhooks.config import Config
from kvmhooks.domain import parse_domain
from kvmhooks.errors import ApplyError
from kvmhooks.ledger import Ledger
from kvmhooks.topology import read_pool
from tests.fakehost import GIB, FakeHost, FakeKernel, domain_xml

UA = "aaaaaaaa-2222-3333-4444-000000000001"
UB = "bbbbbbbb-2222-3333-4444-000000000002"
UC = "cccccccc-2222-3333-4444-000000000003"
# The admin's own pool sizes before kvmhooks touches anything.
ADMIN = {(0, 2048): 40, (1, 2048): 6, (1, 1048576): 1}
XML_A = domain_xml(name="a", uuid=UA, memory_kib=256 * 1024, tuning="<kvm:hugepages size='2M' nodes='0,1'/>")
XML_B = domain_xml(name="b", uuid=UB, memory_kib=192 * 1024, tuning="<kvm:hugepages size='2M' nodes='0,1'/>")
XML_C = domain_xml(name="c", uuid=UC, memory_kib=2 * GIB, tuning="<kvm:hugepages size='1G' nodes='1'/>",
                   backing="<hugepages><page size='1' unit='G'/></hugepages>")


class Dead(BaseException):
    """The process is gone: raised for the crash and for every write after it."""


class Faults:
    """Counts the steps of an operation and breaks the one at ``at``: kill, ENOSPC, EIO (ledger or pool)."""

    def __init__(self, at: int = 0, kind: str = "count", sigkill: bool = False):
        self.at, self.kind, self.sigkill = at, kind, sigkill
        self.steps = 0
        self.dead = False

    def step(self, what: str) -> None:
        if self.dead:
            raise Dead(what)
        self.steps += 1
        if self.steps != self.at:
            return
        if self.kind == "kill":
            if self.sigkill:
                os.kill(os.getpid(), signal.SIGKILL)
            self.dead = True
            raise Dead(what)
        code = errno.ENOSPC if self.kind == "enospc" else errno.EIO
        if what == "pool":
            raise ApplyError("cannot write nr_hugepages", OSError(code, os.strerror(code)))
        raise OSError(code, os.strerror(code))

    @contextmanager
    def installed(self, pools: SysfsPools) -> Iterator[SysfsPools]:
        faults = self
        real_write = Ledger._write
        real_set = type(pools).set

        def write(led: Ledger, text: str) -> None:
            faults.step("ledger")
            real_write(led, text)

        class Broken(type(pools)):  # type: ignore[misc]
            def set(self, node: int, size_kib: int, count: int) -> int:
                faults.step("pool")
                return real_set(self, node, size_kib, count)  # type: ignore[no-any-return]

        Ledger._write = write  # type: ignore[method-assign]
        try:
            yield Broken(pools.sysfs_root, pools.proc_root)
        finally:
            Ledger._write = real_write  # type: ignore[method-assign]


def make_host(root: Path) -> tuple[FakeHost, Config, SysfsPools]:
    host = FakeHost(root, nodes=2, cores_per_node=2).build()
    for (node, size), n in ADMIN.items():
        host.set_pool(node, size, n)
    pools = FakeKernel(host).install()
    return host, host.config(retry_timeout=0.0), pools


def check_invariant(host: FakeHost, cfg: Config, admin: dict[tuple[int, int], int]) -> None:
    state = operations.ledger_for(cfg).read()
    assert not state.intents, state.intents
    assert not [u for u, r in state.domains.items() if r.state == "preparing"]
    # The header's running sums (what planning reads instead of decoding every VM) match the records.
    assert state.domains.summary().to_json() == state.domains.recount().to_json()
    # Every record has its marker (the shell's lookup at stop): a missing one would skip a release.
    held_dir = operations.ledger_for(cfg).held_dir
    assert set(state.domains) <= set(os.listdir(held_dir) if held_dir.exists() else ())
    for (node, size), want in admin.items():
        ps = read_pool(host.sysfs, node, size)
        held = state.reserved(f"node{node}/{size}kB")
        assert ps.nr - ps.surplus == want + held, (node, size, ps, want, held)


def release_all(cfg: Config, pools: SysfsPools) -> None:
    for uuid in list(operations.ledger_for(cfg).read().domains):
        operations.release(uuid, cfg, pools)


def recover(cfg: Config, pools: SysfsPools) -> None:
    """What the next hook call (or `kvmhooks reconcile`) does before anything else."""
    with operations.session(cfg, pools):
        pass


def _child(root: str, op: str, at: int, kind: str) -> None:
    _, cfg, pools = _reopen(root)
    faults = Faults(at, kind, sigkill=True)
    with faults.installed(pools) as broken:
        try:
            run_op(op, cfg, broken)
        except Exception:
            os._exit(3)
    os._exit(0)


def _reopen(root: str) -> tuple[FakeHost, Config, SysfsPools]:
    host = FakeHost(Path(root), nodes=2, cores_per_node=2)
    return host, host.config(retry_timeout=0.0), FakeKernel(host).install()


def run_op(op: str, cfg: Config, pools: SysfsPools) -> None:
    if op == "claim":  # the migrate/restore filter's claim for B coming in
        claim_b(cfg, pools)
    elif op in ("prepare", "claimed-prepare", "settling-prepare"):  # (see setup_two_vms)
        operations.prepare(parse_domain(XML_B), cfg, pools)
    else:
        operations.release(UA, cfg, pools)


def claim_b(cfg: Config, pools: SysfsPools) -> None:
    from kvmhooks.migrate import place

    dom = parse_domain(XML_B)
    operations.claim(dom, cfg, lambda topo, st: place(dom, topo, st, cfg), pools)


def setup_two_vms(root: Path, op: str = "") -> tuple[FakeHost, Config, SysfsPools]:
    host, cfg, pools = make_host(root)
    operations.prepare(parse_domain(XML_A), cfg, pools)
    operations.prepare(parse_domain(XML_C), cfg, pools)
    if op == "claimed-prepare":  # B's claim made before its prepare
        claim_b(cfg, pools)
    if op == "settling-prepare":  # A's stop left for later (hooks/qemu): B's prepare releases A first
        led = operations.ledger_for(cfg)  # (A holds pages, so its stop is never left: the worst case of one)
        (led.stopping_dir / UA).write_text(led.read().domains[UA].token + "\n")
    check_invariant(host, cfg, ADMIN)
    return host, cfg, pools


def count_steps(tmp_path: Path, op: str) -> int:
    _, cfg, pools = setup_two_vms(tmp_path / "count", op)
    faults = Faults()
    with faults.installed(pools) as counting:
        run_op(op, cfg, counting)
    return faults.steps


@pytest.mark.parametrize("op", ["prepare", "release", "claim", "claimed-prepare", "settling-prepare"])
def test_crash_matrix(tmp_path: Path, op: str) -> None:
    steps = count_steps(tmp_path, op)
    assert steps >= (1 if op == "claim" else 3)  # intent commit, a pool write per node, the final commit
    ctx = multiprocessing.get_context("fork")
    for at in range(1, steps + 1):
        for kind in ("kill", "enospc", "eio"):
            root = tmp_path / f"{op}-{at}-{kind}"
            host, cfg, pools = setup_two_vms(root, op)
            p = ctx.Process(target=_child, args=(str(root), op, at, kind))
            p.start()
            p.join(30)
            if kind == "kill":
                assert p.exitcode == -signal.SIGKILL, (at, kind, p.exitcode)
            recover(cfg, pools)
            check_invariant(host, cfg, ADMIN)
            # libvirt calls release after a failed start; a release that failed is retried (reconcile)
            release_all(cfg, pools)
            check_invariant(host, cfg, ADMIN)
            assert operations.ledger_for(cfg).read().domains == {}
            assert not os.listdir(operations.ledger_for(cfg).stopping_dir)
            for (node, size), want in ADMIN.items():
                assert host.pool(node, size) == want, (op, at, kind, node, size)


def test_release_whose_commit_fails_frees_nothing_twice(tmp_path: Path) -> None:
    """Defect 1: release shrank sysfs before its ledger commit; a failed commit and a second release then
    shrank again, and the drift rule lowered the admin's baseline (40 → 8)."""
    host = FakeHost(tmp_path).build()
    host.set_pool(0, 2048, 40)
    pools = FakeKernel(host).install()
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=UA, memory_kib=64 * 1024)), cfg, pools)
    assert host.pool(0) == 40 + 32
    faults = Faults(1, "enospc")  # the first ledger commit of the release fails
    with faults.installed(pools) as broken, pytest.raises(OSError):
        operations.release(UA, cfg, broken)
    assert host.pool(0) == 40 + 32  # nothing shrunk: the VM is still accounted
    operations.release(UA, cfg, pools)
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 40
    operations.prepare(parse_domain(domain_xml(uuid=UB, memory_kib=64 * 1024)), cfg, pools)
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 40


def test_kill_between_pool_write_and_commit_is_rolled_back(tmp_path: Path) -> None:
    """Defect 2: pages raised for a prepare killed before its commit leaked, and the next prepare took the
    inflated pool for the admin's value."""
    host = FakeHost(tmp_path).build()
    host.set_pool(0, 2048, 10)
    pools = FakeKernel(host).install()
    cfg = host.config()
    faults = Faults(3, "kill")  # 1: intent commit, 2: the pool write, 3: the commit after it: dies there
    with faults.installed(pools) as broken, pytest.raises(Dead):
        operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg, broken)
    assert host.pool(0) == 10 + 128  # the pages are there, the commit is not
    operations.prepare(parse_domain(domain_xml(uuid=UB, memory_kib=64 * 1024)), cfg, pools)
    assert host.pool(0) == 10 + 32
    operations.release(UB, cfg, pools)
    assert host.pool(0) == 10


def test_restore_never_turns_surplus_into_persistent_pages(tmp_path: Path) -> None:
    """Defect 9: the restore after a failed prepare wrote back nr including surplus pages."""
    host = FakeHost(tmp_path).build()
    kernel = FakeKernel(host)
    pools = kernel.install()
    cfg = host.config(retry_timeout=0.0)
    operations.prepare(parse_domain(domain_xml(uuid=UA, memory_kib=64 * 1024)), cfg, pools)
    kernel.use(0, 2048, 32)
    operations.release(UA, cfg, pools)  # QEMU still holds its pages: they become surplus
    assert kernel.state(0, 2048) == (32, 0, 32)
    faults = Faults(2, "eio")  # the pool write of the next prepare fails
    with faults.installed(pools) as broken, pytest.raises(ApplyError):
        operations.prepare(parse_domain(domain_xml(uuid=UB, memory_kib=64 * 1024)), cfg, broken)
    kernel.unuse(0, 2048, 32)
    assert kernel.state(0, 2048) == (0, 0, 0)  # the surplus went away; nothing became persistent


def test_a_shrink_the_kernel_cannot_finish_is_retried_not_taken_for_the_admin(tmp_path: Path) -> None:
    """With HVO the kernel may fail to free pages; release records what it really did, and the pool is
    neither counted as an admin resize nor left above the admin's value for good."""
    host = FakeHost(tmp_path).build()
    host.set_pool(0, 2048, 10)
    stuck = FakeKernel(host, fail_free=True)
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=UA, memory_kib=64 * 1024)), cfg, FakeKernel(host).install())
    operations.release(UA, cfg, stuck.install())
    assert host.pool(0) == 42
    state = operations.ledger_for(cfg).read()
    assert state.pools["node0/2048kB"].baseline == 10 and state.pools["node0/2048kB"].expected == 42
    operations.reconcile(cfg, {}, {}, pools=FakeKernel(host).install())
    assert host.pool(0) == 10
    assert "node0/2048kB" not in operations.ledger_for(cfg).read().pools


def test_admin_resize_survives_reconcile_and_the_vm_stop(tmp_path: Path) -> None:
    """Defect 3: reconcile undid an admin's hand resize made while a VM ran (178 → 128, then 0 after stop)."""
    host = FakeHost(tmp_path).build()
    pools = FakeKernel(host).install()
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg, pools)
    pools.set(0, 2048, 178)  # the admin, by hand
    tokens = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    operations.reconcile(cfg, {UA: domain_xml(uuid=UA)}, tokens, pools=pools)
    assert host.pool(0) == 178
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 50


def test_pool_lowered_by_hand_below_what_vms_hold_keeps_their_pages_and_nothing_of_the_admin(
        tmp_path: Path) -> None:
    """The admin takes the pool below the running VM's 128 pages: their own 20 are gone (baseline 0), the VM's
    reservation is restored and noted; after its stop nothing is left (round one restored the admin's 20)."""
    host = FakeHost(tmp_path).build()
    host.set_pool(0, 2048, 20)
    pools = FakeKernel(host).install()
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg, pools)
    pools.set(0, 2048, 100)  # below baseline 20 + held 128, and below held
    tokens = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    out = operations.reconcile(cfg, {UA: domain_xml(uuid=UA)}, tokens, pools=pools)
    assert host.pool(0) == 128
    state = operations.ledger_for(cfg).read()
    assert state.pools["node0/2048kB"].baseline == 0 and any("below the 128 pages" in n for n in state.notes)
    assert any("below the 128 pages" in a for a in out.actions) and any("to 128 pages" in a for a in out.actions)
    operations.release(UA, cfg, pools)
    assert host.pool(0) == 0


def test_reconcile_checks_capacity_before_raising(tmp_path: Path) -> None:
    host = FakeHost(tmp_path).build()
    pools = FakeKernel(host).install()
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg, pools)
    pools.set(0, 2048, 0)
    host.set_free(0, 100 * 1024)  # the memory is gone meanwhile
    tokens = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    out = operations.reconcile(cfg, {UA: domain_xml(uuid=UA)}, tokens, pools=pools)
    assert host.pool(0) == 0 and any("cannot restore pool node0/2048kB" in a for a in out.actions)


def test_reconcile_rechecks_under_the_lock(tmp_path: Path) -> None:
    """Defect 11: a VM restarted between reconcile's look and its action lost its new reservation."""
    host = FakeHost(tmp_path).build()
    pools = FakeKernel(host).install()
    cfg = host.config()
    operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg, pools)
    old = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg, pools)  # the VM restarts meanwhile
    out = operations.reconcile(cfg, {}, old, pools=pools, now=10**10)
    assert UA in operations.ledger_for(cfg).read().domains and host.pool(0) == 128
    assert any("changed while reconcile looked" in a for a in out.actions)
    new = {u: r.token for u, r in operations.ledger_for(cfg).read().domains.items()}
    operations.reconcile(cfg, {}, new, pools=pools, now=10**10)
    assert host.pool(0) == 0


def test_left_alone_pool_pages_are_promised_once(tmp_path: Path) -> None:
    """Defect 11: a left-alone pool promised the same free pages to every VM starting at once."""
    host = FakeHost(tmp_path).build()
    host.set_pool(0, 2048, 200, free=200)
    cfg = host.config(leave_alone=frozenset({"node0/2048kB"}))
    operations.prepare(parse_domain(domain_xml(uuid=UA)), cfg)
    from kvmhooks.errors import CapacityError

    with pytest.raises(CapacityError, match="128 promised to VMs still starting"):
        operations.prepare(parse_domain(domain_xml(uuid=UB)), cfg)
    operations.mark(UA, cfg, state="running")  # its QEMU mapped them: the kernel's resv counts them now
    (host.sysfs / "kernel/mm/hugepages/hugepages-2048kB/resv_hugepages").write_text("128\n")
    with pytest.raises(CapacityError, match="72 usable"):
        operations.prepare(parse_domain(domain_xml(uuid=UB)), cfg)
    assert host.pool(0) == 200


# --- property-based: random sequences with crashes ------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

VMS = {UA: XML_A, UB: XML_B, UC: XML_C,
       "dddddddd-2222-3333-4444-000000000004": domain_xml(name="d", uuid="dddddddd-2222-3333-4444-000000000004",
                                                          memory_kib=128 * 1024)}
POOLS = sorted(ADMIN)

op_strategy = st.one_of(
    st.tuples(st.just("prepare"), st.sampled_from(sorted(VMS)), st.integers(0, 6)),
    st.tuples(st.just("release"), st.sampled_from(sorted(VMS)), st.integers(0, 6)),
    st.tuples(st.just("admin"), st.sampled_from(POOLS), st.integers(-5, 20)),
    st.tuples(st.just("reconnect"), st.sampled_from(sorted(VMS)), st.just(0)),
    st.tuples(st.just("reconcile"), st.just(""), st.just(0)),
)


@hypothesis.settings(max_examples=60, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(ops=st.lists(op_strategy, min_size=1, max_size=12))
def test_invariant_holds_after_every_recovery(tmp_path_factory: pytest.TempPathFactory,
                                              ops: list[tuple[str, object, int]]) -> None:
    host, cfg, pools = make_host(tmp_path_factory.mktemp("prop"))
    admin = dict(ADMIN)
    for kind, arg, n in ops:
        state = operations.ledger_for(cfg).read()
        if kind == "admin":
            node, size = arg  # type: ignore[misc]
            key = f"node{node}/{size}kB"
            cur = host.pool(node, size)
            held = state.reserved(key)
            got = pools.set(node, size, max(held, cur + n))  # the kernel may give fewer than asked
            # Lowered or raised by hand, the admin's value is what they left beyond the VMs' pages (below
            # those: see the unit test above, the pages are restored at the next write).
            admin[(node, size)] += got - cur
            continue
        action: Callable[[SysfsPools], object]
        if kind == "prepare":
            xml = VMS[str(arg)]
            action = lambda p, xml=xml: operations.prepare(parse_domain(xml), cfg, p)  # noqa: E731
        elif kind == "release":
            action = lambda p, u=str(arg): operations.release(u, cfg, p)  # noqa: E731
        elif kind == "reconnect":
            if str(arg) not in state.domains:
                continue  # reconnect concerns running VMs only
            action = lambda p, xml=VMS[str(arg)]: operations.adopt(parse_domain(xml), cfg, p)  # noqa: E731
        else:
            running = {u: VMS[u] for u in state.domains}
            tokens = {u: r.token for u, r in state.domains.items()}
            action = lambda p, r=running, t=tokens: operations.reconcile(cfg, r, t, pools=p)  # noqa: E731
        faults = Faults(n, "kill") if n else Faults()
        with faults.installed(pools) as broken:
            try:
                action(broken)
            except Dead:
                pass
            except Exception:  # a refusal (capacity) must leave everything consistent too
                pass
        if faults.dead:
            recover(cfg, pools)  # the next hook call
        check_invariant(host, cfg, admin)
    release_all(cfg, pools)
    check_invariant(host, cfg, admin)
    for (node, size), want in admin.items():
        assert host.pool(node, size) == want
