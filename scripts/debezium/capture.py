"""Runs Debezium 3.6's embedded engine (PostgreSQL connector + Outbox Event Router) on one
outbox table and prints each routed record as a JSON line prefixed with "RECORD ".

Used by examples/debezium_compare.rs (scripts/debezium-compare) to check outbox-relay's
`--preset debezium` against the real thing. Records are taken after the router; keys and
values as StringConverter writes them (the usual outbox deployment), headers as Kafka
Connect's default header converter (SimpleHeaderConverter) writes them, i.e. the bytes a
Kafka Connect or Debezium Server deployment puts in Kafka.

usage: capture.py HOST PORT DATABASE USER PASSWORD SLOT PUBLICATION COUNT PLACEMENT
Stops after COUNT records.
"""
import json
import sys
import threading

import jpype
from engine import outbox_properties
from pydbzengine import BasePythonChangeHandler, DebeziumEngine

host, port, database, user, password, slot, publication, count, placement = sys.argv[1:10]


class Capture(BasePythonChangeHandler):
    def __init__(self, engine_box, want):
        self.engine_box = engine_box
        self.want = want
        self.seen = 0
        self.converter = None

    def header_text(self, topic, header):
        if self.converter is None:
            self.converter = jpype.JClass("org.apache.kafka.connect.storage.SimpleHeaderConverter")()
            self.converter.configure(jpype.JClass("java.util.HashMap")())
        data = self.converter.fromConnectHeader(topic, header.key(), header.schema(), header.value())
        return None if data is None else bytes(data).decode("utf-8")

    def handleJsonBatch(self, records):
        for record in records:
            source = record.value()  # the routed SourceRecord
            topic = str(record.destination())
            headers = [[str(h.key()), self.header_text(topic, h)] for h in source.headers()]
            print("RECORD " + json.dumps({
                "topic": str(record.destination()),
                "key": None if source.key() is None else str(source.key()),
                "value": None if source.value() is None else str(source.value()),
                "headers": headers,
            }), flush=True)
            self.seen += 1
        if self.seen >= self.want:
            threading.Thread(target=lambda: self.engine_box[0].close()).start()


properties = outbox_properties(
    "compare", host, port, database, user, password, slot, publication,
    {"table.fields.additional.placement": placement},
)
box = [None]
engine = DebeziumEngine(properties=properties, handler=Capture(box, int(count)), format="connect")
box[0] = engine
engine.run()
