"""Custom endpoints (IoT Hub ref §10): an external MQTT broker, an HTTP collector, files.

Each drains the durable message log from its own pinned cursor ``endpoint/{name}`` and moves
it only once the far side has acknowledged (:mod:`.runner`). :mod:`.spec` is the one JSON
shape of their definitions; :mod:`.manager` runs them.
"""
