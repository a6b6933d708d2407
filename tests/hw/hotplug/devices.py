"""USB serial adapters as udev describes them, in umockdev's record format.

Each record is what ``umockdev-record /dev/ttyUSB0`` prints for the tty and its parents (``P:``
sysfs path, ``N:`` node, ``S:`` links, ``E:`` udev properties, ``A:`` sysfs attributes), trimmed
to the keys that matter here. The values follow the layout udev 252's ``usb_id`` and ``path_id``
builtins and ``60-serial.rules`` produce on Debian 12: the FTDI FT232R (0403:6001, serial
number in its EEPROM), a CH340 (1a86:7523, no serial number, so by-id names collide and only
by-path is unique), a u-blox 7 GPS (1546:01a7, CDC-ACM, no serial number) and an on-board UART.

The same text feeds the pure matcher tests (:func:`properties`), the rules evaluator
(:func:`chain`) and umockdev testbeds (``Testbed.add_from_string``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PCI = "/devices/pci0000:00/0000:00:14.0/usb1"

FTDI_A000 = f"""\
P: {PCI}/1-2
N: bus/usb/001/005
E: SUBSYSTEM=usb
E: DEVTYPE=usb_device
E: DRIVER=usb
E: ID_VENDOR_ID=0403
E: ID_MODEL_ID=6001
A: idVendor=0403
A: idProduct=6001
A: manufacturer=FTDI
A: product=FT232R USB UART
A: serial=A000

P: {PCI}/1-2/1-2:1.0
E: SUBSYSTEM=usb
E: DEVTYPE=usb_interface
E: DRIVER=ftdi_sio
A: bInterfaceNumber=00

P: {PCI}/1-2/1-2:1.0/ttyUSB0
E: SUBSYSTEM=usb-serial
E: DRIVER=ftdi_sio
A: port_number=0

P: {PCI}/1-2/1-2:1.0/ttyUSB0/tty/ttyUSB0
N: ttyUSB0
S: serial/by-id/usb-FTDI_FT232R_USB_UART_A000-if00-port0
S: serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0
E: SUBSYSTEM=tty
E: DEVNAME=/dev/ttyUSB0
E: MAJOR=188
E: MINOR=0
E: ID_BUS=usb
E: ID_VENDOR=FTDI
E: ID_VENDOR_ID=0403
E: ID_MODEL=FT232R_USB_UART
E: ID_MODEL_ID=6001
E: ID_SERIAL=FTDI_FT232R_USB_UART_A000
E: ID_SERIAL_SHORT=A000
E: ID_USB_INTERFACE_NUM=00
E: ID_USB_DRIVER=ftdi_sio
E: ID_PATH=pci-0000:00:14.0-usb-0:2:1.0
E: ID_PATH_TAG=pci-0000_00_14_0-usb-0_2_1_0
E: DEVLINKS=/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A000-if00-port0 /dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0
A: dev=188:0
"""

CH340 = f"""\
P: {PCI}/1-4
N: bus/usb/001/007
E: SUBSYSTEM=usb
E: DEVTYPE=usb_device
E: DRIVER=usb
A: idVendor=1a86
A: idProduct=7523
A: product=USB2.0-Serial

P: {PCI}/1-4/1-4:1.0
E: SUBSYSTEM=usb
E: DEVTYPE=usb_interface
E: DRIVER=ch341
A: bInterfaceNumber=00

P: {PCI}/1-4/1-4:1.0/ttyUSB1
E: SUBSYSTEM=usb-serial
E: DRIVER=ch341-uart
A: port_number=0

P: {PCI}/1-4/1-4:1.0/ttyUSB1/tty/ttyUSB1
N: ttyUSB1
S: serial/by-id/usb-1a86_USB2.0-Serial-if00-port0
S: serial/by-path/pci-0000:00:14.0-usb-0:4:1.0-port0
E: SUBSYSTEM=tty
E: DEVNAME=/dev/ttyUSB1
E: MAJOR=188
E: MINOR=1
E: ID_BUS=usb
E: ID_VENDOR=1a86
E: ID_VENDOR_ID=1a86
E: ID_MODEL=USB2.0-Serial
E: ID_MODEL_ID=7523
E: ID_SERIAL=1a86_USB2.0-Serial
E: ID_USB_INTERFACE_NUM=00
E: ID_USB_DRIVER=ch341
E: ID_PATH=pci-0000:00:14.0-usb-0:4:1.0
E: ID_PATH_TAG=pci-0000_00_14_0-usb-0_4_1_0
E: DEVLINKS=/dev/serial/by-path/pci-0000:00:14.0-usb-0:4:1.0-port0 /dev/serial/by-id/usb-1a86_USB2.0-Serial-if00-port0
A: dev=188:1
"""

UBLOX7 = f"""\
P: {PCI}/1-3
N: bus/usb/001/006
E: SUBSYSTEM=usb
E: DEVTYPE=usb_device
E: DRIVER=usb
A: idVendor=1546
A: idProduct=01a7
A: manufacturer=u-blox AG - www.u-blox.com
A: product=u-blox 7 - GPS/GNSS Receiver

P: {PCI}/1-3/1-3:1.0
E: SUBSYSTEM=usb
E: DEVTYPE=usb_interface
E: DRIVER=cdc_acm
A: bInterfaceNumber=00

P: {PCI}/1-3/1-3:1.0/tty/ttyACM0
N: ttyACM0
S: serial/by-id/usb-u-blox_AG_-_www.u-blox.com_u-blox_7_-_GPS_GNSS_Receiver-if00
S: serial/by-path/pci-0000:00:14.0-usb-0:3:1.0
E: SUBSYSTEM=tty
E: DEVNAME=/dev/ttyACM0
E: MAJOR=166
E: MINOR=0
E: ID_BUS=usb
E: ID_VENDOR=u-blox_AG_-_www.u-blox.com
E: ID_VENDOR_ID=1546
E: ID_MODEL=u-blox_7_-_GPS_GNSS_Receiver
E: ID_MODEL_ID=01a7
E: ID_SERIAL=u-blox_AG_-_www.u-blox.com_u-blox_7_-_GPS_GNSS_Receiver
E: ID_USB_INTERFACE_NUM=00
E: ID_USB_DRIVER=cdc_acm
E: ID_PATH=pci-0000:00:14.0-usb-0:3:1.0
E: ID_PATH_TAG=pci-0000_00_14_0-usb-0_3_1_0
E: DEVLINKS=/dev/serial/by-id/usb-u-blox_AG_-_www.u-blox.com_u-blox_7_-_GPS_GNSS_Receiver-if00 /dev/serial/by-path/pci-0000:00:14.0-usb-0:3:1.0
A: dev=166:0
"""

TTYS0 = """\
P: /devices/platform/serial8250
E: SUBSYSTEM=platform
E: DRIVER=serial8250

P: /devices/platform/serial8250/tty/ttyS0
N: ttyS0
E: SUBSYSTEM=tty
E: DEVNAME=/dev/ttyS0
E: MAJOR=4
E: MINOR=64
A: dev=4:64
"""


@dataclass
class SysDevice:
    """One ``P:`` block: a sysfs device with its udev properties and attributes."""

    path: str
    node: str | None = None
    links: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def kernel(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def sys_path(self) -> str:
        return "/sys" + self.path


def parse(record: str) -> list[SysDevice]:
    devices: list[SysDevice] = []
    for block in record.strip().split("\n\n"):
        device: SysDevice | None = None
        for line in block.splitlines():
            tag, _, value = line.partition(": ")
            if tag == "P":
                device = SysDevice(value)
                devices.append(device)
                continue
            assert device is not None, "a record block starts with P:"
            if tag == "N":
                device.node = value
            elif tag == "S":
                device.links.append(value)
            elif tag in ("E", "A"):
                key, _, val = value.partition("=")
                (device.env if tag == "E" else device.attrs)[key] = val
    return devices


def chain(record: str) -> list[SysDevice]:
    """The tty (the last block) first, then its parents, nearest first."""
    devices = parse(record)
    tty = devices[-1]
    parents = sorted((d for d in devices[:-1] if tty.path.startswith(d.path + "/")),
                     key=lambda d: -len(d.path))
    return [tty, *parents]


def properties(record: str) -> tuple[str, dict[str, str]]:
    """The tty's sys path and udev properties, as a uevent or the udev database gives them."""
    tty = parse(record)[-1]
    return tty.sys_path, dict(tty.env)
