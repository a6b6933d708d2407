"""The serial bridge: line protocols (NMEA 0183, JSON lines, regex, delimited) from serial ports.

``framing`` and ``nmea`` are pure; ``port`` is the only pyserial user; ``bridge`` is the
:class:`hw.bridge.Bridge`. Nothing is imported here, so importing the pure modules stays pure.
"""
