"""Ctrl-C (or Ray's cancel, the same simulated SIGINT) never cuts an MLflow call in two: under deferral it is
raised at the caller's check, and the sqlite store stays writable for the rest of the sweep."""

from __future__ import annotations

import _thread
import random
import signal
import sqlite3
import threading
import time

import pytest
from mlflow.entities import Metric

from runners.tracking.interrupts import check_interrupt, deferred_interrupts
from runners.tracking.runs import client


def store_writable(db: str, run_id: str, key: str) -> bool:
    """Whether another connection can write the file now (a lock left behind makes it wait, then fail)."""
    con = sqlite3.connect(db, timeout=0.5)
    try:
        con.execute("insert into tags(key, value, run_uuid) values (?, 'v', ?)", (key, run_id))
        con.commit()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def test_interrupts_at_random_moments_of_store_calls_leave_the_store_writable(tmp_path):
    """Without the deferral, 34 of 60 such interrupts left the file locked (runners.tracking.interrupts)."""
    db = tmp_path / "mlflow.db"
    store = client(f"sqlite:///{db}")
    run_id = store.create_run(store.create_experiment("x")).info.run_id
    rng = random.Random(0)
    for attempt in range(20):
        step = attempt * 100_000
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            threading.Timer(rng.uniform(0.0, 0.05), _thread.interrupt_main).start()
            while True:
                store.log_batch(run_id, metrics=[Metric("m", 1.0, 0, step)])
                store.get_run(run_id)
                step += 1
                check_interrupt()
        assert store_writable(str(db), run_id, f"probe{attempt}"), f"locked after interrupt {attempt}"


def test_an_interrupt_not_checked_is_raised_when_the_outermost_block_ends():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may start us ignoring it)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            with deferred_interrupts():
                _thread.interrupt_main()
                time.sleep(0.01)  # the handler runs between bytecodes: it has noted the SIGINT by now
            reached.append("the inner block ended quietly")
    finally:
        signal.signal(signal.SIGINT, before)
    assert reached == ["the inner block ended quietly"]


def test_off_the_main_thread_nothing_is_deferred():
    seen = []

    def body():
        with deferred_interrupts():
            check_interrupt()
            seen.append("ran")

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == ["ran"]
