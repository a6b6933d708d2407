"""Modbus RTU/TCP bridge: typed register maps, one scheduler per bus, probe, profiles."""
