"""Get-Queue with several worker processes: each worker's part of a queue is summed, and queues that only share
a name (two send connectors to one smart host) stay apart."""

from __future__ import annotations

from mailgate.manage.present import Record
from mailgate.supervisor import merge_queues


def queue(identity: str, connector: str, count: int, status: str = "Ready") -> Record:
    return Record("Queue", {"Identity": identity, "QueueIdentity": identity, "NextHopConnector": connector,
                            "MessageCount": count, "Status": status, "RetryCount": 0})


def test_parts_of_one_queue_are_summed_and_queues_of_two_connectors_stay_apart():
    worker0 = [queue("EX01\\[10.0.0.5]", "Relay25", 2), queue("EX01\\[10.0.0.5]", "Relay587", 1, "Retry")]
    worker1 = [queue("EX01\\[10.0.0.5]", "Relay25", 3, "Active")]
    merged = merge_queues([worker0, worker1])
    by_connector = {r["NextHopConnector"]: r for r in merged}
    assert len(merged) == 2
    assert by_connector["Relay25"]["MessageCount"] == 5 and by_connector["Relay25"]["Status"] == "Active"
    assert by_connector["Relay587"]["MessageCount"] == 1 and by_connector["Relay587"]["Status"] == "Retry"
