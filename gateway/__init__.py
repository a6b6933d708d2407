"""Edge gateway appliance: a local IoT hub speaking Azure IoT Hub's device protocol."""

__version__ = "0.1.0"
