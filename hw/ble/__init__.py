"""The BLE bridge: advertisement decoders (pure), the bleak-based central, the bridge.

Import :mod:`hw.ble.bridge` for the bridge; :mod:`hw.ble.decoders` and :mod:`hw.ble.config`
stay importable without bleak.
"""
