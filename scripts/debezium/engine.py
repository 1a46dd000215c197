"""The Debezium 3.6 embedded-engine settings both our Debezium scripts share: the
PostgreSQL connector on an existing slot and publication (pgoutput, nothing created, no
snapshot), in-memory offsets flushed every second (Debezium confirms the slot's LSN when it
commits offsets; Kafka Connect's default is a minute), and the Outbox Event Router.
Each script adds its own router settings.
"""


def outbox_properties(name, host, port, database, user, password, slot, publication, router):
    properties = {
        "name": name,
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "offset.storage": "org.apache.kafka.connect.storage.MemoryOffsetBackingStore",
        "offset.flush.interval.ms": "1000",
        "database.hostname": host,
        "database.port": port,
        "database.user": user,
        "database.password": password,
        "database.dbname": database,
        "topic.prefix": name,
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": publication,
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "transforms": "outbox",
        "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
    }
    properties.update({f"transforms.outbox.{key}": value for key, value in router.items()})
    return properties
